"""ReparamTask.load_weights (``--model.weights``): the task's one way in for weight files."""
from __future__ import annotations

import pytest
import torch
from conftest import perturb_params, randomize_bn

from backbones import create, reparameterize_model
from backbones.weights.io import save_checkpoint
from tasks.classification import ClassificationTask
from tasks.segmentation import SegmentationTask

ARCH = "repmlp_res_tiny"


def _classifier(**kwargs) -> ClassificationTask:
    torch.manual_seed(0)
    return ClassificationTask(ARCH, num_classes=5, **kwargs)


def _segmenter() -> SegmentationTask:
    torch.manual_seed(0)
    return SegmentationTask("resnet_tiny_d8", num_classes=4, head_channels=16, aux_channels=8, inference="whole")


def test_deploy_backbone_file_converts_the_task_and_computes_what_it_computed(tmp_path):
    trained = randomize_bn(perturb_params(_classifier(), seed=1))
    x = torch.randn(2, 3, 64, 64)
    deploy = reparameterize_model(trained.backbone)
    path = tmp_path / "deploy.safetensors"
    save_checkpoint(deploy, path, ARCH, trained.backbone_args())
    task = _classifier().eval()
    weights = task.load_weights(str(path))
    assert weights.deploy and task.deploy and task.backbone.deploy
    with torch.no_grad():
        assert torch.allclose(task(x), deploy(x), rtol=0, atol=0)


def test_a_file_of_another_arch_is_refused_naming_both(tmp_path):
    path = tmp_path / "other.safetensors"
    save_checkpoint(create("resnet_tiny", num_classes=5), path, "resnet_tiny", {"num_classes": 5})
    with pytest.raises(ValueError, match=f"{path} holds backbone 'resnet_tiny', but this run builds 'repmlp_res_tiny'"):
        _classifier().load_weights(str(path))


def test_deploy_weights_cannot_start_a_fit(tmp_path):
    path = tmp_path / "deploy.safetensors"
    save_checkpoint(reparameterize_model(create(ARCH, num_classes=5)), path, ARCH, {"num_classes": 5})
    task = _classifier()
    task.trainer_stage = lambda: "fit"
    with pytest.raises(ValueError, match=f"{path} holds deploy \\(converted\\) weights, which cannot be trained"):
        task.load_weights(str(path))


def test_backbone_file_fine_tunes_with_initialized_heads_and_is_refused_for_testing(tmp_path, capsys):
    source = perturb_params(create("resnet_tiny_d8", num_classes=0), seed=4)
    path = tmp_path / "backbone.pth"
    save_checkpoint(source, path, "resnet_tiny_d8", {"num_classes": 0})
    task = _segmenter()
    heads = {k: v.clone() for k, v in task.state_dict().items() if not k.startswith("backbone.")}
    task.trainer_stage = lambda: "fit"
    task.load_weights(str(path))
    for k, v in source.state_dict().items():
        assert torch.equal(task.backbone.state_dict()[k], v), k
    for k, v in heads.items():
        assert torch.equal(task.state_dict()[k], v), k
    assert "loaded the backbone; auxiliary_head, decode_head start(s) initialized" in capsys.readouterr().out
    tester = _segmenter()  # outside fit the heads are needed: the file is not enough
    with pytest.raises(ValueError, match="holds the backbone alone, and this task also needs its auxiliary_head, "
                                         "decode_head: test the run's deploy.ckpt"):
        tester.load_weights(str(path))


def test_weights_are_read_once_at_the_first_setup(tmp_path):
    source = perturb_params(_classifier(), seed=5)
    path = tmp_path / "task.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    task = _classifier(weights=str(path))
    assert not torch.equal(task.backbone.fc.weight, source.backbone.fc.weight)
    task.setup("fit")
    assert torch.equal(task.backbone.fc.weight, source.backbone.fc.weight)
    path.unlink()  # a second stage (the test after fit) does not read it again
    task.setup("test")


def test_bad_weights_match_is_named():
    with pytest.raises(ValueError, match="model.weights_match must be 'all' or 'matching', got 'some'"):
        _classifier(weights_match="some")
