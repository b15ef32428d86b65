"""What the probes' fork server imports once (``probe.probe_processes``): TensorFlow and
Keras, quietly and with the settings they read as they load (``device.prepare_tensorflow``),
and the probe's own code; no device is touched. Each probe is forked from that server, so
it starts in a fraction of a second instead of importing TensorFlow again (about 5 s), and
still initialises its device (CUDA on a GPU) itself, as a fresh process does.
"""

from tbptt_exp.core.device import load_tensorflow, prepare_tensorflow

prepare_tensorflow()
load_tensorflow(find_devices=False)

import tbptt_exp.core.engines
import tbptt_exp.core.probes.probe  # noqa: F401  (the code every probe runs)
