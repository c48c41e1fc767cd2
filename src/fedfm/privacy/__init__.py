"""Privacy: client-level DP-FedAvg with accounting, example-level DP-SGD, secure aggregation, attack audits."""
