"""Drop-in modules with other projects' APIs on genkern's kernels: change the import, keep the code.

from genkern.compat.causal_conv1d import causal_conv1d_fn, causal_conv1d_update   # Dao-AILab/causal-conv1d
"""
