"""Batch-size sweeps at fixed sigma/B and fixed steps (issue 7), trained with fastdp itself.

``fastdp experiment batch-sweep`` (cli.py) runs ``sweep.run_sweep`` on a ``SweepConfig``
(protocol.py); each run is ``train.train_run`` through fastdp's PrivacyEngine; results.py
writes and analyses results.csv; plots.py draws from the CSVs; data.py and cifar10.py load
MNIST-1D (cached) and CIFAR-10 (local pickle files). See README.md for the protocol and the
results.
"""

from fastdp.theory.experiments.protocol import ALGORITHMS, RunSpec, SweepConfig

__all__ = ["ALGORITHMS", "RunSpec", "SweepConfig", "run_sweep"]


def __getattr__(name: str):
    if name == "run_sweep":  # imported lazily: it pulls in torch, tqdm and matplotlib
        from fastdp.theory.experiments.sweep import run_sweep

        return run_sweep
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
