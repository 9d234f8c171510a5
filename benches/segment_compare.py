"""Times waterz and cc3d on the arrays `cuboids bench-segment --python PY` wrote, so that their
throughput is printed next to cuboids' on the same machine.

    python segment_compare.py affinities.f32 probability.f32 X,Y,Z [both|segment|connected-components]

Affinities: 3 Fortran-ordered float32 channels (x, y, z), each the edge to the -x/-y/-z voxel;
waterz wants (3, z, y, x) C order with channel 0 = z, which is the same bytes with the channel
order reversed. Prints one JSON line per tool.
"""
import json
import sys
import time

import cc3d
import numpy as np
import waterz

aff_path, prob_path, shape = sys.argv[1], sys.argv[2], sys.argv[3]
which = sys.argv[4] if len(sys.argv) > 4 else "both"
x, y, z = (int(v) for v in shape.split(","))
aff = np.fromfile(aff_path, dtype=np.float32).reshape(3, z, y, x)[::-1].copy()
prob = np.fromfile(prob_path, dtype=np.float32).reshape(z, y, x)

if which in ("both", "segment"):
    t = time.perf_counter()
    for _ in waterz.agglomerate(aff, [0.7], aff_threshold_low=0.001, aff_threshold_high=0.9999):
        pass
    print(json.dumps({"tool": "waterz 0.10 watershed + mean-affinity agglomeration", "seconds": time.perf_counter() - t}))

if which in ("both", "connected-components"):
    t = time.perf_counter()
    cc3d.connected_components(prob > 0.5, connectivity=26)
    print(json.dumps({"tool": "cc3d 4.1 connected components (26)", "seconds": time.perf_counter() - t}))
