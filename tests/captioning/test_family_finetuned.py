"""A fine-tuned output directory written by ModelScope's own trainer code loads and captions like ModelScope.

What of ModelScope's trainer runs here (offline, beside torch 2.13 CPU): ``Model.from_pretrained`` (how
``OFATrainer`` loads the model: ``OfaForAllTasks`` from the checkpoint directory) and the whole save path,
``CheckpointHook`` (``before_run``: ``CheckpointProcessor.prepare_output`` copies the model files and writes the
trainer's configuration.json into ``{work_dir}/output``; ``after_train_epoch`` at the last epoch:
``save_checkpoints`` writes ``{work_dir}/epoch_2.pth`` with ``OfaForAllTasks.state_dict()`` and links it to
``{work_dir}/output/pytorch_model.bin``). ``OFATrainer`` itself and its label-smoothed criterion cannot be imported
here (they need the HF ``datasets`` package), so its set-up copy of the model directory into ``work_dir`` is
done with ``shutil.copytree`` (as its ``recursive_overwrite``) and the training is one plain SGD step on
ModelScope's model (teacher-forced cross-entropy on a caption), enough to move every weight.
"""

from __future__ import annotations

import json
import logging
import shutil
import types

import pytest
import torch

from load_tests.testkit.reference import (
    Reference,
    _quiet_modelscope,
    assert_tie_aware_parity,
    engine_results,
    install_stand_ins,
)
from ofa_captioning.captioner import Captioner

pytestmark = pytest.mark.reference


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory, demo_checkpoint, image_corpus):
    _quiet_modelscope()
    install_stand_ins()
    from modelscope.models.base import Model
    from modelscope.trainers.hooks.checkpoint.checkpoint_hook import CheckpointHook
    from modelscope.utils.config import Config

    work = tmp_path_factory.mktemp("ofa-finetune") / "workspace"
    hub_copy = work.parent / "hub"
    shutil.copytree(demo_checkpoint, hub_copy, ignore=shutil.ignore_patterns(".*"))
    model = Model.from_pretrained(str(hub_copy))  # OfaForAllTasks, as OFATrainer loads it
    shutil.copytree(hub_copy, work)  # OFATrainer: recursive_overwrite(model_dir, work_dir)
    cfg = Config.from_file(str(work / "configuration.json"))
    cfg.train = {"max_epochs": 2, "checkpoint": {"period": {"interval": 2}}}

    # One training step on ModelScope's model: cross-entropy of a caption given an image.
    ref = Reference(hub_copy)
    pixels = ref.pixels([image_corpus[4][1]])
    net = ref.net_input(pixels)
    target = torch.tensor([[9, 10, 11, 12, 2]])
    decoder_in = torch.cat([torch.zeros(1, 1, dtype=torch.long), target[:, :-1]], 1)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    logits = model.model(**net, decoder_input_ids=decoder_in).logits
    loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), target.view(-1))
    loss.backward()
    optimizer.step()
    model.eval()

    trainer = types.SimpleNamespace(
        work_dir=str(work),
        model=model,
        cfg=cfg,
        epoch=1,  # 0-based: the second and last epoch
        iter=9,
        inner_iter=4,
        max_epochs=2,
        hooks=[],
        metric_values={"CIDEr": 0.5},
        optimizer=optimizer,
        lr_scheduler=None,
        train_preprocessor=None,
        eval_preprocessor=None,
        logger=logging.getLogger("test"),
        unwrap_module=lambda m: m,
    )
    hook = CheckpointHook(interval=2)
    hook.before_run(trainer)
    hook.after_train_epoch(trainer)
    return work


def test_output_layout(work_dir):
    out = work_dir / "output"
    assert (work_dir / "epoch_2.pth").is_file() and (work_dir / "epoch_2_trainer_state.pth").is_file()
    assert (out / "pytorch_model.bin").samefile(
        work_dir / "epoch_2.pth"
    )  # hard link (or copy) of the epoch file
    state = torch.load(out / "pytorch_model.bin", map_location="cpu", weights_only=True)
    assert len(state) == 541 and all(k.startswith("model.") for k in state)
    task = json.loads((out / "configuration.json").read_text())
    assert task["pipeline"] == {"type": "image-captioning"} and task["train"]["max_epochs"] == 2
    assert {"config.json", "vocab.json", "merges.txt"} <= {p.name for p in out.iterdir()}


def test_finetuned_output_captions_like_reference(work_dir, image_corpus):
    out = work_dir / "output"
    ref = Reference(out)
    engine = Captioner.from_pretrained(out)
    pictures = [image_corpus[i][1] for i in (4, 13)]
    pixels = ref.pixels(pictures)
    want = ref.results(pixels, num_return_sequences=2)
    got = engine_results(engine, pixels, num_captions=2)
    assert_tie_aware_parity(ref, pixels, got, want)
    # The output holds the fine-tuned weights; work_dir's own pytorch_model.bin is the untouched copy.
    original = engine_results(Captioner.from_pretrained(work_dir), pixels)
    assert [g[0].score for g in got] != [o[0].score for o in original]
