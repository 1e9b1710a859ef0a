"""Generation: sampling settings (Tables 5/7), the rollout type and engine interface, the one HF
``generate`` path and the colocated vLLM engine."""

# The decoding settings keep their short import path (and the one that module hparams of
# checkpoints written before the package split pickled).
from egm.generation.sampling import TABLE5_ROLLOUT, TABLE7_INFERENCE, SamplingParams  # noqa: F401
