"""Lepton cloud coordinator."""
