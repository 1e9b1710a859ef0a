"""DeepSpeed glue, in one place: a CPU DeepSpeed strategy for tests, and the four points where
EGM's own loops meet DeepSpeed's engine.

Real (GPU) runs use Lightning's ``DeepSpeedStrategy`` unchanged. The modules call only the four
helpers below, each a no-op without DeepSpeed:

* :func:`begin_micro_batch` -- GRPO accumulates micro-batches itself (manual optimisation:
  several forward/``manual_backward`` pairs inside one ``training_step``, one ``opt.step()``).
  Lightning gives the engine ``gradient_accumulation_steps = accumulate_grad_batches = 1``, so
  DeepSpeed treats every backward as a boundary and ZeRO-1/2 rebuild the averaged gradient from
  the last micro-batch alone; and ZeRO-3 only accumulates from one micro-batch to the next when
  ``DeepSpeedEngine.forward`` ran in between, which these forwards bypass (they call the Hugging
  Face model; the engine wraps the whole ``training_step``), so it overwrote each gradient with
  the next one. Before each micro-batch this marks whether it closes the step and does what the
  engine's forward does first.
* :func:`deepspeed_loss_factor` -- SFT (automatic optimisation with accumulation): Lightning divides
  the returned loss by ``accumulate_grad_batches`` and ``DeepSpeedEngine.backward`` divides it by
  its ``gradient_accumulation_steps`` (Lightning sets it to the same number), so the gradient would
  be 1/accumulation too small and clipping would act at accumulation x the configured norm.
* :func:`gathered_parameters` -- under ZeRO-3 each rank holds a shard of every parameter; an
  export (``save_pretrained``) must gather them first, on every rank (it is a collective).
* :func:`zero3_for_transformers` -- under ZeRO-3 Lightning builds the model inside
  ``deepspeed.zero.Init``; transformers must be told, or ``from_pretrained`` initialises and loads
  weights into empty shards (it fails on the first indexed init).

:class:`CPUDeepSpeedStrategy` is for the test suite and CPU smoke runs only (gloo, no GPU): it
lifts Lightning's three CPU refusals. It and :func:`begin_micro_batch` rely on Lightning /
DeepSpeed private API, listed in :data:`INTERNALS` and checked by ``tests/test_strategies.py``, so
that an upgrade that changes it fails there, loudly, instead of silently changing what runs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

#: Private API that :class:`CPUDeepSpeedStrategy` and :func:`begin_micro_batch` re-implement or
#: rely on (Lightning 2.6.6, DeepSpeed 0.19.8): ``"module:qualname"`` -> source fragments it is expected to contain. A test
#: fails when an upgrade changes any of them; then re-read that function and update the override.
INTERNALS: dict[str, tuple[str, ...]] = {
    "lightning.pytorch.strategies.deepspeed:DeepSpeedStrategy.setup_environment":
        ("CUDAAccelerator", "super().setup_environment()"),
    "lightning.pytorch.strategies.deepspeed:DeepSpeedStrategy.setup_distributed":
        ("_validate_device_index_selection(self.parallel_devices)", "reset_seed()", "self.set_world_ranks()",
         "self._init_deepspeed_distributed()"),
    "lightning.pytorch.strategies.deepspeed:DeepSpeedStrategy._init_deepspeed_distributed":
        ("deepspeed.init_distributed(",),
    "lightning.pytorch.strategies.deepspeed:DeepSpeedStrategy._setup_model_and_optimizer":
        ("device_rank=self.root_device.index",),
    "deepspeed.comm.torch:build_shm_op": ("deepspeed.ops.__compatible_ops__.get(builder.NAME, False)",),
    # begin_micro_batch repeats the ZeRO optimiser call that opens DeepSpeedEngine.forward
    "deepspeed.runtime.engine:DeepSpeedEngine.forward": ("self.optimizer.clear_backward_seen_flag()",),
}
SHM_COMM_OP = "deepspeed_shm_comm"


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy`` on CPU processes (gloo) -- tests and CPU smoke runs only.

    DeepSpeed itself runs ZeRO 0-3 on CPU (``DS_ACCELERATOR=cpu``); Lightning refuses in three
    places, which this subclass lifts and nothing else: ``setup_environment`` demands a CUDA
    accelerator, ``setup_distributed`` validates CUDA device indices, and ``root_device`` would be
    the accelerator's device list entry (Lightning passes its index to DeepSpeed as ``device_rank``).
    Use with ``Trainer(accelerator="cpu", devices=N)`` or in YAML::

        trainer:
          accelerator: cpu
          strategy:
            class_path: egm.strategies.CPUDeepSpeedStrategy
            init_args: {stage: 2}

    ``DS_ACCELERATOR`` must be ``cpu`` before DeepSpeed is first imported; the constructor sets it
    when unset and refuses to run on any other DeepSpeed accelerator.

    Args:
        shm_comm: use DeepSpeed's shared-memory CPU all-reduce. It is a C++ op that DeepSpeed
            compiles on first use (about 100 s on 2 busy cores, once per machine), so it is off by
            default: collectives then go through plain gloo, which is all the tests need.
        *args, **kwargs: ``DeepSpeedStrategy``'s (``stage``, ``config``, ...).
    """

    strategy_name = "deepspeed_cpu"

    def __init__(self, *args, shm_comm: bool = False, **kwargs):
        self.shm_comm = shm_comm
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        kwargs.setdefault("process_group_backend", "gloo")
        super().__init__(*args, **kwargs)
        from deepspeed.accelerator import get_accelerator

        name = get_accelerator().device_name()
        if name != "cpu":
            raise RuntimeError(f"CPUDeepSpeedStrategy: DeepSpeed's accelerator is {name!r}, not 'cpu': set "
                               "DS_ACCELERATOR=cpu before deepspeed is imported (GPU runs: use DeepSpeedStrategy)")

    @classmethod
    def register_strategies(cls, strategy_registry) -> None:
        """Not registered by name (the inherited method would re-register ``"deepspeed"`` as this class)."""

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # skips DeepSpeedStrategy's CUDA-only check

    def setup_distributed(self) -> None:
        # DeepSpeedStrategy.setup_distributed without _validate_device_index_selection (CUDA indices)
        if not self.shm_comm:  # DeepSpeed documents edits of this dict as persistent
            import deepspeed.ops

            deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", self.local_rank)


def is_deepspeed(trainer: Trainer | None) -> bool:
    return trainer is not None and isinstance(trainer.strategy, DeepSpeedStrategy)


def begin_micro_batch(trainer: Trainer | None, last: bool) -> None:
    """Call before each micro-batch's forward of a manually accumulated optimiser step; ``last``
    is True only for the micro-batch after whose backward ``opt.step()`` follows.

    Under DeepSpeed it sets the engine's accumulation boundary (public API), so that ZeRO-1/2 keep
    accumulating until the step, and opens the micro-batch as ``DeepSpeedEngine.forward`` would
    (the ZeRO optimiser's ``clear_backward_seen_flag``: ZeRO-3 counts micro-batches there and
    otherwise copies each gradient over the previous one instead of adding it). The engine's loss
    scaling by ``1/gradient_accumulation_steps`` stays a no-op: manual optimisation runs with
    ``accumulate_grad_batches = 1`` (Lightning refuses anything else), and the caller's loss is
    already normalised over the whole mini-batch. Call it on every rank for the same number of
    micro-batches.
    """
    if not is_deepspeed(trainer):
        return
    engine = trainer.strategy.deepspeed_engine
    if engine.gradient_accumulation_steps() != 1:
        raise RuntimeError(f"manual accumulation under DeepSpeed needs gradient_accumulation_steps 1, "
                           f"got {engine.gradient_accumulation_steps()}")
    engine.set_gradient_accumulation_boundary(last)
    if hasattr(engine.optimizer, "clear_backward_seen_flag"):  # ZeRO stages 1-3
        engine.optimizer.clear_backward_seen_flag()


def deepspeed_loss_factor(trainer: Trainer | None) -> int:
    """Multiply an automatic-optimisation ``training_step`` loss by this, so that its gradient is
    divided by the accumulation once, as without DeepSpeed.

    Lightning divides the returned loss by ``accumulate_grad_batches``; ``DeepSpeedEngine.backward``
    divides again by its ``gradient_accumulation_steps`` (which Lightning sets to the same number).
    """
    if not is_deepspeed(trainer):
        return 1
    return int(trainer.strategy.deepspeed_engine.gradient_accumulation_steps())


@contextlib.contextmanager
def gathered_parameters(model: torch.nn.Module) -> Iterator[None]:
    """Full parameters inside the block, read-only; call on every rank (ZeRO-3 gathers collectively).

    Without ZeRO-3 (no partitioned parameter) it does nothing. Gathering all parameters at once
    needs the whole model in each rank's device memory for the duration of the block (an export
    at the end of training: 2 bytes/parameter in bf16).
    """
    params = list(model.parameters())
    if not any(hasattr(p, "ds_id") for p in params):  # ZeRO-3 tags every parameter it partitions
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def zero3_for_transformers(trainer: Trainer | None):
    """Under ZeRO-3, tell transformers before ``from_pretrained`` (its ``HfDeepSpeedConfig``); keep
    the returned object alive for the run: transformers holds only a weak reference. ``None``
    otherwise.

    Lightning calls ``configure_model`` inside ``deepspeed.zero.Init``, which partitions every
    parameter as it is created. Only when transformers knows does ``from_pretrained`` skip its
    weight init on those empty shards and load the checkpoint shard-wise into them. The same flag
    makes ``generate`` run with ``synced_gpus`` on several ranks, so that a rank whose responses
    finished early keeps joining the others' parameter gathers instead of leaving them hanging.
    """
    if not (is_deepspeed(trainer) and trainer.strategy.zero_stage_3):
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(trainer.strategy.config)
