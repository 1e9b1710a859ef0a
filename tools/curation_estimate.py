"""Teacher requests and prompt-text tokens of the curation jobs for the paper's Table 2: an estimate.

    python tools/curation_estimate.py [--trial data/curated/x.jsonl.stats.json ...]

Requests: one per sample and job. Table 2 gives the samples kept: 575,208 vanilla (Fig. 8, one
request each) and 23,698 amodal. The paper says the Fig. 10 verification dropped about half of
the generated descriptions, so Figs. 9 and 10 were asked about some 2 x 23,698 objects and Fig. 11
about the 23,698 kept. Retries of failed or malformed replies come on top.

Prompt text: each job's real request (the job's own request builder) for a representative sample:
RefCOCO's ref 0 of ``tests/fixtures`` ("the lady with the blue shirt", 427x640) for Fig. 8; for
Figs. 9-11 a made-up occluded person on an image of Table 2's mean amodal size (1186x717).
Characters are counted; tokens are estimated as characters / 4, the usual rule of thumb for English
text with OpenAI's tokenisers: an estimate, not a count. Not in it: the image (its tokens depend on
the provider's image accounting) and the reply (capped by ``teacher.max_tokens``). A trial job
(``egm curate ... --limit 100``) measures both: pass its ``.stats.json`` with ``--trial`` to scale
its measured tokens per request to the job's full request count.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from egm.curation.client import TeacherConfig
from egm.curation.jobs import amodal_reasoning_request, description_request, vanilla_request, verification_request
from egm.data.manifest import Sample

TABLE2_VANILLA = 575_208
TABLE2_AMODAL = 23_698
VERIFICATION_KEEPS = 0.5  # "This verification step filtered out about 50% of the generated samples" (Appendix B)
CHARS_PER_TOKEN = 4
FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"


def representative_samples() -> dict[str, Sample]:
    refs = json.loads((FIXTURES / "refer_refs_unc_sample.json").read_text())
    ref0, facts = refs["refs"][0], refs["derived_facts_for_ref0"]
    w, h = facts["image_581857_width_height"]
    vanilla = Sample(id="refcoco_unc_0", image="unused.jpg", width=w, height=h, sentence=ref0["sentences"][0]["sent"],
                     task="vanilla", box=facts["bbox_xyxy_abs"], split="refcoco_unc_train", source="refcoco",
                     category=facts["category_name"])
    amodal = Sample(id="cocoa_1", image="unused.jpg", width=1186, height=717, task="amodal",
                    sentence="the man in the grey coat standing behind the parked white van",
                    box=[400.0, 200.0, 520.0, 560.0], visible_box=[400.0, 200.0, 520.0, 420.0],
                    split="cocoa_train", source="cocoa", category="person")
    return {"vanilla": vanilla, "amodal": amodal}


def estimate() -> list[dict]:
    s = representative_samples()
    asked = round(TABLE2_AMODAL / VERIFICATION_KEEPS)
    jobs = [
        ("vanilla (Fig. 8)", TABLE2_VANILLA, vanilla_request(s["vanilla"])),
        ("amodal_description (Fig. 9)", asked, description_request(s["amodal"])),
        ("amodal_verification (Fig. 10)", asked, verification_request(s["amodal"])),
        ("amodal_reasoning (Fig. 11)", TABLE2_AMODAL, amodal_reasoning_request(s["amodal"])),
    ]
    rows = []
    for name, requests, req in jobs:
        chars = len(req.prompt)
        tokens = math.ceil(chars / CHARS_PER_TOKEN)
        rows.append({"job": name, "key": req.job, "requests": requests, "prompt_chars": chars,
                     "prompt_tokens_est": tokens, "prompt_tokens_est_total": tokens * requests})
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trial", nargs="*", default=[], help=".stats.json files of trial jobs (egm curate --limit N)")
    args = p.parse_args(argv)
    rows = estimate()
    cap = TeacherConfig().max_tokens
    print("| job | requests | prompt text, characters | prompt text tokens (characters / 4) | all requests |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['job']} | {r['requests']:,} | {r['prompt_chars']:,} | ~{r['prompt_tokens_est']:,} | "
              f"~{r['prompt_tokens_est_total'] / 1e6:.1f} M |")
    total = sum(r["requests"] for r in rows)
    text = sum(r["prompt_tokens_est_total"] for r in rows)
    print(f"| all jobs | {total:,} | | | ~{text / 1e6:.1f} M |")
    print(f"\nReplies: at most {cap} tokens each (teacher.max_tokens), {total * cap / 1e6:.1f} M in all at the cap.")
    by_key = {r["key"]: r for r in rows}
    for path in args.trial:
        st = json.loads(Path(path).read_text())
        n = st.get("requests", 0)
        row = by_key.get(st.get("job"))
        if not n or row is None:
            print(f"{path}: no requests of a known job in it")
            continue
        i, o = st["input_tokens"] / n, st["output_tokens"] / n
        print(f"{path}: {n} requests measured {i:.0f} input + {o:.0f} output tokens each -> "
              f"{row['requests']:,} requests: {row['requests'] * i / 1e6:.1f} M input + {row['requests'] * o / 1e6:.1f} M output tokens")


if __name__ == "__main__":
    main()
