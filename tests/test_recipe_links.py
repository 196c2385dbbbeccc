"""Values shared by data and model are written once in a recipe and linked by ZooCLI (``link_arguments``):
model_name model -> data, and num_classes / in_chans / image size data -> model. Each test parses a real recipe
(``run=False``: models are built, nothing is trained) and checks that a changed value reaches the other side."""
from __future__ import annotations

import pytest
import torch

from zoo.data import DigitsDataModule
from zoo.training import run_lightning_cli


class FiveDigits(DigitsDataModule):
    """Digits with a different fixed class count (what a DataModule with its own classes looks like to the link)."""

    num_classes = 5


def _cli(*args: str):
    return run_lightning_cli([*args, "--trainer.logger=false"], run=False)


def _first_conv(model: torch.nn.Module) -> torch.nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))


def _last_linear(model: torch.nn.Module) -> torch.nn.Linear:
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]


def test_snn_recipe_takes_channels_size_and_classes_from_the_data():
    cli = _cli("-c", "snn/digits_vgg_ann")  # the recipe writes image_size 16 / in_chans 1 once, under data
    args = cli.model.hparams.model_args
    assert (args["img_size"], args["in_chans"], cli.model.hparams.num_classes) == (16, 1, 10)
    net = cli.model.model
    assert _first_conv(net).in_channels == 1 and _last_linear(net).out_features == 10
    fc_in = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][0].in_features
    assert fc_in == 128 * (16 // 8) ** 2  # three 2x2 pools

    cli = _cli("-c", "snn/digits_vgg_ann", "--data.init_args.image_size=32", "--data.init_args.in_chans=3")
    net = cli.model.model
    assert cli.model.hparams.model_args["img_size"] == 32 and _first_conv(net).in_channels == 3
    assert [m for m in net.modules() if isinstance(m, torch.nn.Linear)][0].in_features == 128 * (32 // 8) ** 2
    x = cli.datamodule.train_dataloader().dataset[0][0]
    assert x.shape == (3, 32, 32)  # the data and the model agree


def test_num_classes_follows_the_data_unless_the_model_sets_it(tmp_path):
    cli = _cli("-c", "quickstart", f"--data={__name__}.FiveDigits")
    assert cli.model.hparams.num_classes == 5 and _last_linear(cli.model.model).out_features == 5
    assert cli.model.hparams.model_args["in_chans"] == 3  # quickstart's data in_chans
    assert cli.datamodule.hparams.image_size == 32
    # the image size is not pushed into models that take any size (Next-ViT has no img_size argument)
    assert "img_size" not in cli.model.hparams.model_args
    # a value given for the model wins (e.g. an ADE20K-layout dataset with other classes)
    cli = _cli("-c", "quickstart", "--model.init_args.num_classes=7")
    assert cli.model.hparams.num_classes == 7 and _last_linear(cli.model.model).out_features == 7
    # README's own-data command: a folder dataset (classes counted when read) keeps the model's value
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
    cli = _cli("-c", "quickstart", "--data", "zoo.data.ImageFolderDataModule", f"--data.init_args.root={tmp_path}",
               "--data.init_args.input_size=[3, 64, 64]", "--model.init_args.num_classes=2")
    assert _last_linear(cli.model.model).out_features == 2 and "in_chans" not in cli.model.hparams.model_args


def test_link_functions():
    from zoo.training import _model_args_from_data, _num_classes_from_data

    data = {"class_path": "zoo.data.DigitsDataModule", "init_args": {"image_size": 16, "in_chans": 1}}
    task = {"class_path": "zoo.tasks.ImageClassification", "init_args": {"num_classes": 1000}}  # the task's default
    assert _num_classes_from_data(data, task) == 10
    assert _num_classes_from_data(data, {**task, "init_args": {"num_classes": 7}}) == 7
    seg = {"class_path": "zoo.tasks.segmentation.SemanticSegmentation", "init_args": {"num_classes": None}}
    assert _num_classes_from_data({"class_path": "zoo.data.segmentation.ADE20K"}, seg) == 150
    folder = {"class_path": "zoo.data.ImageFolderDataModule", "init_args": {"root": "x"}}
    assert _num_classes_from_data(folder, {**task, "init_args": {"num_classes": 100}}) == 100  # counted at read time
    assert _model_args_from_data("snn_vgg16", {"cfg": [8, "A"]}, data) == {"cfg": [8, "A"], "in_chans": 1,
                                                                          "img_size": 16}
    assert _model_args_from_data("nextvit_small", None, data) == {"in_chans": 1}
    with pytest.raises(ValueError, match="img_size=32 but data image_size=16.*--data.init_args.image_size"):
        _model_args_from_data("snn_vgg16", {"img_size": 32}, data)
