"""The recipes ``quantize_`` takes (bitnet_ao/config.py): what they accept, what they refuse and how they say it."""

from __future__ import annotations

import dataclasses

import pytest

from bitnet_ao import BitNetInferenceConfig, BitNetTrainingConfig, bitnet_inference, bitnet_training


def test_defaults_are_ternary_with_both_int8_gradients_and_one_scale():
    config = bitnet_training()
    assert bitnet_training is BitNetTrainingConfig and bitnet_inference is BitNetInferenceConfig
    assert (config.int8_grad_input, config.int8_grad_weight, config.weights) == (True, True, "ternary")
    assert (config.scale_groups, config.group_dim, config.grouped) == (1, 0, False)
    assert bitnet_inference().weights is None


def test_a_recipe_is_frozen_and_hashable():
    """One recipe may serve many linears (and key compile caches): it cannot change under them."""
    config = bitnet_training(weights="binary")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.weights = "ternary"
    assert hash(config) == hash(bitnet_training(weights="binary")) and config == bitnet_training(weights="binary")


def test_invalid_fields_are_refused_naming_the_field_and_the_value():
    with pytest.raises(ValueError, match=r"weights must be 'ternary' or 'binary', got 'quaternary'"):
        bitnet_training(weights="quaternary")
    with pytest.raises(ValueError, match=r"scale_groups must be a positive int, got 2\.0"):
        bitnet_training(scale_groups=2.0)
    with pytest.raises(ValueError, match=r"scale_groups must be a positive int, got -1"):
        bitnet_training(scale_groups=-1)
    with pytest.raises(ValueError, match=r"group_dim must be 0 \(groups of output rows\) or 1 .*got -1"):
        bitnet_training(group_dim=-1)
    with pytest.raises(ValueError, match=r"'ternary', 'binary' or None, got 'int4'"):
        bitnet_inference(weights="int4")


def test_grouped_means_more_than_one_scale():
    assert not bitnet_training(scale_groups=1, group_dim=1).grouped
    assert bitnet_training(scale_groups=2).grouped


@pytest.mark.parametrize("group_dim", [0, 1])
def test_check_shape_names_the_dimension_the_groups_do_not_divide(group_dim):
    config = bitnet_training(scale_groups=3, group_dim=group_dim)
    shape, name = ((20, 30), "out_features") if group_dim == 0 else ((30, 20), "in_features")
    linear = f"nn.Linear(in_features={shape[1]}, out_features={shape[0]})"
    expected = f"where: scale_groups=3 with group_dim={group_dim} must divide {name}=20 ({linear})"
    with pytest.raises(ValueError) as error:
        config.check_shape(shape, "where")
    assert str(error.value) == expected
    # The other dimension is not grouped: any size goes.
    config.check_shape((21, 31) if group_dim == 0 else (31, 21), "where")
    bitnet_training().check_shape((7, 5), "where")
