"""Reference model definitions and small shipped artifacts."""
