"""Pure federated-learning kernels: aggregation arithmetic, the strategies, the privacy
accountant, client selection and update screening. No I/O (an import-linter contract)."""
