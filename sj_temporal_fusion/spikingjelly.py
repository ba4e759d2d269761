"""The activation_based front end under its former name (``frontends/activation_based.py``): models
pickled by earlier versions name ``sj_temporal_fusion.spikingjelly._backend_name``, and importers of
this module keep working. It is that module, not a copy: patching an attribute here patches it there."""
import sys

from .frontends import activation_based

sys.modules[__name__] = activation_based
