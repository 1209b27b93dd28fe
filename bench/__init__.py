"""Throughput and memory benchmarks of private training (imported as ``fastdp.bench``).

``fastdp bench`` runs them; see bench/cli.py for the modes and bench/harness.py for how time
and memory are measured. Results committed under bench/results/ feed the README section
that bench/report.py generates.
"""
