"""Loader throughput (PIL load + decode + default collate); thin script over `egm.data.datamodule.bench_loader`.

    python tools/bench_data.py --num_workers 2
"""

from jsonargparse import CLI

from egm.data.datamodule import bench_loader

if __name__ == "__main__":
    CLI(bench_loader)
