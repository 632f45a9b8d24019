"""The Trainer: one object owns the engine, the batch stream, the train state, the tracker, the step machinery and
the checkpoint manager. `train()` runs the curriculum's epochs, `train_step()` one optimizer step; read top to bottom.

An optimizer step is always `accumulation` whole micro-batches. A window with a NaN/inf loss on any rank is
skipped as a whole by the engine (`finish_window`), so every epoch has the same steps and batches and no partial
accumulation crosses an epoch, a stage change or a checkpoint: resume is exact. Per step: one collective and at
most one host read, a step late (step.py). Stop signals (signals.py) and time-based saves are agreed through that
collective; the step's fate is decided on the device. Test-only faults come in as a Faults object (faults.py).
"""
from __future__ import annotations

from typing import Optional

import torch.distributed as dist
from tqdm import tqdm

from mmcoconut.config import ConfigError
from mmcoconut.data.curriculum import stage_for_epoch

from .batches import TrainStream, to_device
from .checkpoint.manager import CheckpointManager
from .checkpoint.resume import ResumePoint
from .checkpoint.states import TrainState, seed_everything
from .engines import create_engine
from .engines.base import EngineSpec
from .errors import TrainError
from .faults import Faults
from .schedule import make_scheduler_factory
from .signals import EXIT_CONFIG, EXIT_ERROR, EXIT_OK, EXIT_STOPPED, Stopped, stop_request
from .step import Decision, Steps
from .tracking import Tracker
from .validate import val_accuracy_due, validate


def run(cfg, spec: EngineSpec, resume: Optional[ResumePoint], faults: Faults = Faults()) -> int:
    """`python -m mmcoconut.train` after the process group exists: train, and turn the outcome into the exit code
    (docs/training.md, "Preemption and exit codes")."""
    stop = stop_request()  # before anything slow: a signal during the model build is honoured at step 1
    rank = dist.get_rank()
    try:
        lock = lock_run_dir(cfg, rank, dist.get_world_size())
        try:
            Trainer(cfg, spec, resume, faults).train()
        finally:
            if lock is not None:
                lock.release()
        return EXIT_OK
    except Stopped as e:
        if rank == 0:
            print(f"train: {e}", flush=True)
        return EXIT_STOPPED
    except ConfigError as e:  # the run dir is locked, ... (raised on every rank alike)
        if rank == 0:
            print(f"error: {e}", flush=True)
        return EXIT_CONFIG
    except TrainError as e:
        if rank == 0 or not e.agreed:
            print(f"error: {e}", flush=True)
        return EXIT_ERROR
    finally:
        stop.uninstall()


def lock_run_dir(cfg, rank: int, world: int):
    """Rank 0 takes the run-dir lock and repairs the run dir under it (partial checkpoints, torn index); every
    rank learns the outcome from one broadcast, so a refused run stops everywhere before any model is built."""
    from .checkpoint.index import recover
    from .checkpoint.lock import RunLock

    lock, err = None, None
    if rank == 0:
        try:
            lock = RunLock(cfg.run_dir).acquire()
            recover(cfg.run_dir)
        except ConfigError as e:
            err = str(e)
    if world > 1:
        box = [err]
        dist.broadcast_object_list(box, src=0)
        err = box[0]
    if err:
        raise ConfigError(err)
    return lock


class Trainer:
    def __init__(self, cfg, spec: EngineSpec, resume: Optional[ResumePoint] = None, faults: Faults = Faults()):
        from mmcoconut.data.loader import StreamingLoader
        from mmcoconut.factory import build_image_processor, build_model, build_tokenizer

        t = cfg.train
        self.cfg, self.faults, self.stop = cfg, faults, stop_request()
        seed_everything(t.seed)
        self.engine = engine = create_engine(spec, cfg)  # before the model: ZeRO-3 shards it while it loads
        self.rank, self.world = engine.rank, engine.world
        self.tokenizer = build_tokenizer(cfg.model)
        model = build_model(cfg.model, self.tokenizer, edit_params=engine.param_editor)
        if cfg.model.init_from and resume is None:  # seed: load_model_path (a resumed run has its checkpoint's)
            from mmcoconut.export.init_from import load_init_weights
            load_init_weights(model, cfg.model.init_from, self.rank)
        self.processor = build_image_processor(cfg.model)
        loader = StreamingLoader(cfg.data.train_shards, self.tokenizer, self.processor, cfg, rank=self.rank,
                                 world_size=self.world, micro_batch_size=spec.micro_batch_size,
                                 n_image_tokens=model.n_image_tokens, seed=t.seed)
        self.steps_per_epoch = self._steps_per_epoch(len(loader), spec.accumulation)
        engine.wrap(model, make_scheduler_factory(t, self.steps_per_epoch * t.num_epochs, self._stage_of_step))
        loader.pin_memory = engine.device.type == "cuda"
        self.state, self.stream = TrainState(), TrainStream(loader)
        self.checkpoints = CheckpointManager(cfg, engine, self.state, self.stream)
        self.tracker = Tracker(cfg, self.rank, resumed=resume is not None)
        if resume is not None:
            self.checkpoints.load(resume)  # last: it also sets the RNG the first step draws from
        self.steps = Steps(cfg, self.state, self.tracker, engine, faults.stop_after_steps)
        self._say_notes(engine.notes + (resume.notes if resume is not None else []))

    def _steps_per_epoch(self, micro_batches: int, acc: int) -> int:
        """Whole optimizer steps per epoch; the rest of the epoch's micro-batches is not used."""
        n = micro_batches // acc
        if self.cfg.train.max_steps_per_epoch:
            n = min(n, self.cfg.train.max_steps_per_epoch)
        if n == 0:
            raise ValueError(f"{micro_batches} micro-batches per rank per epoch < gradient_accumulation_steps {acc}: "
                             "not one optimizer step; use more data or a smaller global batch")
        return n

    def _stage_of_step(self, step: int) -> int:
        return stage_for_epoch(self.cfg.curriculum, step // self.steps_per_epoch)

    def _say_notes(self, notes: list) -> None:
        tracker = self.tracker
        if tracker.config_moved is not None:
            notes.append(f"{self.cfg.run_dir}/config.yaml changed; the previous one is {tracker.config_moved}")
            tracker.log("config_change", step=self.state.step, previous=str(tracker.config_moved),
                        changes={k: list(v) for k, v in tracker.config_changes.items()})
        for note in notes if self.rank == 0 else ():
            print(f"note: {note}", flush=True)

    # ---------------------------------------------------------------- the run
    def train(self) -> dict:
        """cfg.train.num_epochs epochs (from where a resumed run stopped). Returns the final TrainState."""
        try:
            self._epochs()
        finally:
            self.tracker.close()
        if self.cfg.checkpoint.export_final:  # Hugging Face dir from the live engine (every rank gathers)
            from mmcoconut.export.hf_export import export_engine
            export_engine(self.engine, self.cfg, self.state, self.tokenizer, self.processor)
        return self.state.state_dict()

    def _epochs(self) -> None:
        cfg, state, engine = self.cfg, self.state, self.engine
        self._say_start()
        engine.train()  # from_pretrained returns eval-mode modules: dropout must be on from the first step
        first_epoch = state.epoch + 1 if state.epoch_done else state.epoch
        for epoch in range(first_epoch, cfg.train.num_epochs):
            # ---- curriculum: stage of this epoch; Coconut resets the optimizer when the stage changes
            stage = stage_for_epoch(cfg.curriculum, epoch)
            if state.epoch_done or epoch != state.epoch:  # a new epoch (not the continuation of a resumed one)
                state.step_in_epoch, state.batch_in_epoch, state.epoch_done = 0, 0, False
            batches = self.stream.epoch(epoch, stage)
            if stage != state.stage:
                self.tracker.log("stage", step=state.step, epoch=epoch, stage=stage)
                if cfg.curriculum.reset_optimizer:
                    engine.reset_optimizer_state()
            state.epoch, state.stage = epoch, stage

            # ---- optimizer steps of `accumulation` micro-batches
            bar = tqdm(total=self.steps_per_epoch, initial=state.step_in_epoch, disable=self.rank != 0,
                       desc=f"epoch {epoch} stage {stage}", dynamic_ncols=True)
            while state.step_in_epoch < self.steps_per_epoch:
                decision = self.train_step(batches)
                bar.update(1)
                if self.rank == 0 and self.steps.book.last_loss is not None:
                    bar.set_postfix(loss=f"{self.steps.book.last_loss:.4f}", lr=f"{self.steps.book.last_lr:.2e}",
                                    refresh=False)
                if decision.save:
                    self.save(f"step{state.step:08d}")
                if decision.stop:
                    bar.close()
                    raise Stopped(self._stopped_message())
                if decision.finish:
                    bar.close()
                    if self.rank == 0:
                        print(f"train: stopping after step {state.step} (test fault stop_after_steps)", flush=True)
                    return
                self.faults.pause(state.step, self.rank)
            bar.close()
            if not self._end_epoch(epoch):
                return

    def train_step(self, batches) -> Decision:
        """One optimizer step of `accumulation` micro-batches; the engine steps (or skips) on the last one."""
        engine, state, steps, acc = self.engine, self.state, self.steps, self.engine.spec.accumulation
        steps.begin()
        for i in range(acc):
            batch = next(batches)  # the loader has >= steps_per_epoch * acc batches: never runs dry
            rows, mask = batch["input_ids"].shape[0], batch["attention_mask"]
            state.batch_in_epoch += 1
            # the label-only loss: no [B, T, V] logits in training (modeling/loss.py)
            loss = engine.forward(dict(to_device(batch, engine.device, engine.dtype), return_logits=False)).loss
            loss = self.faults.poison(loss, self.rank, state.step * acc + i + 1)
            steps.add(loss, rows, mask)
            if i < acc - 1:
                engine.backward_accumulate(loss)
                continue
            # last micro-batch: the step's one collective decides its fate on every rank alike
            vec = steps.reduce(self.stop.requested, self.stream.loader.skip_counts)
            values = engine.finish_window(steps.sync, vec, loss, overflow=self.faults.overflow(engine.global_steps + 1))
        state.step, state.step_in_epoch = engine.global_steps, state.step_in_epoch + 1
        return steps.close(vec, engine.grad_norm(), values, info=dict(
            step=state.step, epoch=state.epoch, stage=state.stage, lr=engine.lr(), loss_scale=engine.loss_scale(),
            skipped_steps=engine.skipped_steps, last=state.step_in_epoch == self.steps_per_epoch))

    def _end_epoch(self, epoch: int) -> bool:
        """Checkpoint, then validation (skipped when stopping). Returns whether training goes on."""
        cfg, book = self.cfg, self.steps.book
        self.state.epoch_done = True
        self.save(f"epoch{epoch + 1:03d}")
        if book.stop_seen and epoch + 1 < cfg.train.num_epochs:
            raise Stopped(self._stopped_message())
        if book.stop_seen:
            if self.rank == 0:
                print("train: stop requested at the end of the last epoch: training is complete; final "
                      "validation skipped", flush=True)
            return False
        if cfg.data.val_shards and cfg.eval.val_every_epoch:
            validate(self, accuracy=val_accuracy_due(cfg, epoch))
        return True

    def save(self, tag: str) -> None:
        self.steps.flush()  # the checkpoint's counters include every step so far
        self.checkpoints.save(tag)
        self.steps.saved()
        self.stop.last_checkpoint = f"{self.cfg.run_dir}/{tag}"

    def _say_start(self) -> None:
        spec, state = self.engine.spec, self.state
        if self.rank == 0:
            print(f"train: world {self.world}, micro {spec.micro_batch_size}, accumulation {spec.accumulation}, "
                  f"global batch {spec.global_batch_size}, {self.steps_per_epoch} steps/epoch, {spec.describe()}, "
                  f"{spec.precision}, run dir {self.cfg.run_dir}"
                  + (f", resumed at step {state.step} (epoch {state.epoch})" if state.step else ""), flush=True)

    def _stopped_message(self) -> str:
        stop, state = self.stop, self.state
        why = stop.why if stop.requested else "a stop signal reached another rank"
        return (f"stopped at step {state.step} (epoch {state.epoch}): {why}. Checkpoint {stop.last_checkpoint} is "
                f"saved; run the same command again to resume from it (checkpoint.resume=auto). Exit code "
                f"{EXIT_STOPPED} means: stopped by a signal after saving, resumable.")
