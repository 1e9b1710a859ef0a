"""Thin script over the importers (same as `egm import-refer|import-cocoa|import-tao-amodal`).

    python tools/import_data.py import_refer --data_root data/refer --out_dir data/manifests
    python tools/import_data.py import_cocoa --annotation_json COCO_amodal_val2014.json --image_dir val2014 --out m.jsonl
    python tools/import_data.py import_tao_amodal --annotation_json validation.json --image_dir frames --out m.jsonl
"""

from jsonargparse import CLI

from egm.data.cocoa import import_cocoa
from egm.data.refer import import_refer
from egm.data.tao_amodal import import_tao_amodal

if __name__ == "__main__":
    print(CLI([import_refer, import_cocoa, import_tao_amodal]))
