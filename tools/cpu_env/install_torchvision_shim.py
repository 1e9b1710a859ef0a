"""Install ``egm_torchvision_cpu`` into the running venv's site-packages when torchvision needs it.

Run by ``make test`` with the test venv's python. Does nothing when ``import torchvision``
already works; otherwise copies the shim plus a ``.pth`` line and checks that torchvision now
imports in a fresh process (exit status 1 with the error if it still does not).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHECK = "import torchvision.transforms.v2"


def imports() -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True)


def main() -> int:
    site = Path(sysconfig.get_paths()["purelib"])
    if (site / "egm_torchvision_cpu.pth").exists():
        shutil.copy(HERE / "egm_torchvision_cpu.py", site / "egm_torchvision_cpu.py")  # keep it current
    elif imports().returncode == 0:
        print(f"torchvision imports as installed; no shim needed in {site}")
        return 0
    else:
        shutil.copy(HERE / "egm_torchvision_cpu.py", site / "egm_torchvision_cpu.py")
        (site / "egm_torchvision_cpu.pth").write_text("import egm_torchvision_cpu\n")
    res = imports()
    if res.returncode != 0:
        print(f"torchvision still fails to import after installing the shim:\n{res.stderr}", file=sys.stderr)
        return 1
    print(f"installed the torchvision CPU shim into {site} (see tools/cpu_env/egm_torchvision_cpu.py)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
