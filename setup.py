"""The one compiled part of easgd: the int8 codec's fused kernels (src/easgd/_int8.c).

Everything else is in pyproject.toml. The extension is optional: without a C compiler the
install still succeeds and easgd.compress runs the same arithmetic in eager PyTorch, about
2.5x slower, and says so once (``easgd.compress.INT8_KERNEL``).
"""

import sys

from setuptools import Extension, setup

flags = [] if sys.platform == "win32" else ["-O3", "-std=c11", "-ffp-contract=off"]
setup(ext_modules=[Extension("easgd._int8", ["src/easgd/_int8.c"], optional=True,
                             extra_compile_args=flags)])
