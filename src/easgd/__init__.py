"""easgd: Elastic Averaging SGD (Zhang, Choromanska & LeCun, NIPS 2015) for PyTorch.

The update rules live in :mod:`easgd.algorithms`; :mod:`easgd.sim` runs P replicas in one
process (the oracle every distributed path is tested against); :mod:`easgd.analysis.stability`
holds the paper's stability analysis of EASGD against ADMM.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
