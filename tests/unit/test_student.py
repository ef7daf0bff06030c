"""Student presets (kdstore/student.py): a smaller copy of a teacher's config that transformers builds and runs."""

from __future__ import annotations

import pytest
import torch

from kdstore.errors import KdstoreError
from kdstore.student import PRESETS, check_student_source, preset_config, preset_name


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_grouped_query_teacher_keeps_its_head_width_and_query_to_kv_ratio(name):
    from transformers import AutoModelForCausalLM, Qwen2Config

    teacher = Qwen2Config(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, intermediate_size=512,
                          num_hidden_layers=4, vocab_size=300)  # head_dim 32, 4 query heads per key/value head
    width, depth = PRESETS[name]
    student = preset_config(name, teacher)
    assert student.hidden_size == 256 * width and student.num_attention_heads == 8 * width
    assert student.num_key_value_heads == max(1, student.num_attention_heads // 4)  # quarter: 2 heads, 1 kv head
    assert student.intermediate_size == 512 * width and student.num_hidden_layers == 4 * depth
    assert student.layer_types == teacher.layer_types[:student.num_hidden_layers] and student.vocab_size == 300
    assert (teacher.hidden_size, teacher.num_hidden_layers, len(teacher.layer_types)) == (256, 4, 4)  # a copy
    logits = AutoModelForCausalLM.from_config(student)(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 300)


def test_a_narrow_teacher_keeps_one_head_and_one_layer():
    from transformers import LlamaConfig

    teacher = LlamaConfig(hidden_size=32, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
                          num_hidden_layers=1, head_dim=16, vocab_size=50)
    student = preset_config("quarter", teacher)
    assert (student.num_attention_heads, student.hidden_size, student.head_dim) == (1, 16, 16)
    assert (student.num_key_value_heads, student.num_hidden_layers, student.intermediate_size) == (1, 1, 16)


def test_a_config_without_the_scaled_fields_is_refused_naming_them():
    from transformers import GPT2Config

    with pytest.raises(KdstoreError, match="teacher's gpt2 config has no intermediate_size"):
        preset_config("quarter", GPT2Config())


def test_preset_names():
    assert preset_name("preset:quarter") == "quarter" and preset_name("student.json") is None
    check_student_source("preset:half")  # no error: nothing on disk to look for
    with pytest.raises(KdstoreError, match="unknown student preset 'preset:Quarter'"):
        check_student_source("preset:Quarter")
