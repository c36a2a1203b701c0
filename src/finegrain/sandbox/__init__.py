"""The sandbox: a simulated RLHF environment with a token-level gold truth (see domain.py), its
simulated annotators, oracle editor and gold judge, and `finegrain demo`."""
