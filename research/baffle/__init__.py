"""BAFFLE: forward-only federated training (issue 6)."""
