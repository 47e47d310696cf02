"""The bird's-eye-view application of lmdfx: models, data, training, evaluation and the command line.

The generic core (``lmdfx`` outside this package) never imports from here.
"""
