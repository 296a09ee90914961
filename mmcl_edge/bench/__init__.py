"""Benchmark tools (bench cl, learn, soak, latency's PyTorch-eager reference, encoder probes, plots), apart from the learner."""
