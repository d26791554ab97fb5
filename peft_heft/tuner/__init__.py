"""The HEFT tuner, laid out like ``peft/tuners/lora/``: the config, the tuner model and what they are built from.

* :mod:`.config`: :class:`HeftConfig`;
* :mod:`.model`: :class:`HeftModel`, PEFT's lifecycle (inject, activate, delete, unload, save/load);
* :mod:`.stages`: each adapter's training stage, and what trains and applies in it;
* :mod:`.layer`: the decoder-layer hooks: routing, each call's plan, and the gather -> intervene -> scatter math;
* :mod:`.placement`: the decoder layers, each layer's dtype and device, 4-bit bases;
* :mod:`.generation`: ``generate()``'s pinned prompt locations and the KV cache's length;
* :mod:`.interventions`, :mod:`.positions`: the intervention modules and the position specs.
"""

from .config import HeftConfig
from .model import HeftModel

__all__ = ["HeftConfig", "HeftModel"]
