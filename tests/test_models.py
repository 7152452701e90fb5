"""SAFE model invariants on a small, untrained tiny LLaVA built from configs (real transformers code).

The base-equality tests compare against a pristine copy of the base that never had hooks or LoRA
attached, so "g = 0 is the base" is checked against the real thing, not against itself.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from safe.core.errors import SafeError
from safe.models.audio_encoders import TinyConvEncoder
from safe.models.presets import get_preset
from safe.models.prompts import (
    IGNORE_INDEX,
    LLAVA_V1,
    SPLICE_AFTER,
    TINY,
    VICUNA_SYSTEM,
    encode_example,
    encode_examples,
)
from safe.models.safe_model import SAFEModel
from safe.models.tiny_base import build_processor, build_tokenizer, build_untrained

CORPUS = [
    "USER: <image>\nAnswer the question using a single word or phrase. ASSISTANT:",
    "USER: Describe the sound. ASSISTANT:",
    "what color is the circle? what shape is the red object? is there a blue square? how many shapes are there?",
    "red green blue yellow circle square triangle yes no 1 2 3",
    "a dog barks twice a high beep sounds once over a faint hiss",
]
QUESTIONS = ["what color is the circle?", "is there a blue square?", "how many?"]
MODES = [("xattn", 0), ("prefix", 0), ("xattn", 4), ("prefix", 4)]


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    tokenizer = build_tokenizer(CORPUS)
    processor = build_processor(tokenizer)
    base = build_untrained(tokenizer, seed=0)
    encoder = TinyConvEncoder(seed=0, clip_seconds=1.0)
    return tokenizer, processor, base, encoder


def make_model(parts, fusion="xattn", lora_rank=0, perturb=True, **overrides) -> SAFEModel:
    tokenizer, processor, base, encoder = parts
    preset = get_preset("tiny", fusion=fusion, lora_rank=lora_rank, clip_seconds=1.0, **overrides)
    model = SAFEModel(copy.deepcopy(base), processor, encoder, preset, base_name="test-tiny")
    if perturb:
        # Move the trainable parts off their identity init so the SAFE path really differs from the base.
        torch.manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_trainable_parameters().items():
                if name.endswith("alpha"):
                    p.fill_(0.8)
                elif "lora_B" in name:
                    p.normal_(std=0.2)
    return model


def images(n):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)) for _ in range(n)]


def audio(n, seconds=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, int(16000 * seconds), generator=g) * 0.1


def vl_batch(model, n=3, answers=True, with_audio=True):
    return model.builder.vqa_batch(images(n), QUESTIONS[:n], ["red", "yes", "2"][:n] if answers else None,
                                   audio=audio(n) if with_audio else None)


def caption_batch(model, n=3, answers=True):
    caps = ["a dog barks twice", "a high beep sounds once", "a beep"][:n]
    return model.builder.caption_batch(audio(n, seed=1), caps if answers else None)


def base_logits(base, model, batch):
    with torch.no_grad():
        return base(**model.base_inputs(batch)).logits


# ------------------------------------------------------------------------------------------ prompts


def test_prompt_labels_only_on_answer_and_eos(parts):
    tokenizer = parts[0]
    enc = encode_example(tokenizer, TINY.vqa("what color is the circle?"), "red")
    answer = [t for t, label in zip(enc.input_ids, enc.labels) if label != IGNORE_INDEX]
    assert answer == [tokenizer.convert_tokens_to_ids("red"), tokenizer.eos_token_id]
    assert enc.input_ids[: enc.prompt_len] == tokenizer(TINY.vqa("what color is the circle?"))["input_ids"]
    head = tokenizer(SPLICE_AFTER)["input_ids"]
    assert enc.input_ids[: enc.splice_pos] == head
    assert TINY.caption() == "USER: Describe the sound. ASSISTANT:"
    assert TINY.vqa("q?") == "USER: q?\n<image> ASSISTANT:"


def test_llava_prompts_are_llava_1_5_as_published(parts):
    """vicuna_v1: the system message, a space, then USER/ASSISTANT; VQA asks for a single word or phrase."""
    assert LLAVA_V1.vqa("q?") == (VICUNA_SYSTEM + " USER: <image>\nq?\nAnswer the question using a single word "
                                  "or phrase. ASSISTANT:")
    assert LLAVA_V1.caption() == VICUNA_SYSTEM + " USER: Describe the sound. ASSISTANT:"
    assert LLAVA_V1.without_system().vqa("q?").startswith("USER: <image>\nq?")
    # The prefix-mode splice point sits right after "USER:" behind the system message.
    tokenizer = parts[0]
    enc = encode_example(tokenizer, LLAVA_V1.vqa("q?"), "red", splice_prefix=LLAVA_V1.splice_prefix())
    assert enc.input_ids[: enc.splice_pos] == tokenizer(VICUNA_SYSTEM + " USER:")["input_ids"]


def test_batch_rows_do_not_depend_on_batch_mates_or_on_the_token_memo(parts):
    from safe.models.batching import BatchBuilder

    tokenizer = parts[0]
    questions = ("what color is the circle?", "how many shapes are there?", "is there a red square?")
    prompts = [TINY.vqa(q) for q in questions]
    answers = ["red", "2", "no"]
    warm = BatchBuilder(tokenizer)
    first = warm.encode("vl", prompts, answers)
    again = warm.encode("vl", prompts, answers)                 # every row from the memo
    assert len(warm._memo) == 3
    pairs = ((first.input_ids, again.input_ids), (first.labels, again.labels), (first.splice_pos, again.splice_pos))
    for a, b in pairs:
        assert torch.equal(a, b)
    for row in range(3):                                        # each row alone, from a fresh builder
        alone = BatchBuilder(tokenizer).encode("vl", [prompts[row]], [answers[row]])
        width = alone.input_ids.shape[1]
        assert torch.equal(first.input_ids[row, -width:], alone.input_ids[0])
        assert torch.equal(first.labels[row, -width:], alone.labels[0])
        assert first.splice_pos[row] - (first.input_ids.shape[1] - width) == alone.splice_pos[0]
        single = encode_example(tokenizer, prompts[row], answers[row])
        assert alone.input_ids[0].tolist() == single.input_ids and alone.labels[0].tolist() == single.labels
    # The same prompt with and without an answer are different entries (generation batches have no labels).
    assert warm.encode("vl", prompts[:1]).labels is None
    # Warming ahead of time (what the trainer does with every training caption) gives the same rows.
    ahead = BatchBuilder(tokenizer)
    assert ahead.warm(prompts, answers) == 3
    warmed = ahead.encode("vl", prompts, answers)
    assert torch.equal(warmed.input_ids, first.input_ids) and torch.equal(warmed.labels, first.labels)
    # The memo keeps to its byte budget; examples past it are still encoded, just not kept.
    small = BatchBuilder(tokenizer)
    small.MEMO_BYTES = warm._memo_bytes // 2
    capped = small.encode("vl", prompts, answers)
    assert 0 < len(small._memo) < 3 and small._memo_bytes <= small.MEMO_BYTES
    assert torch.equal(capped.input_ids, first.input_ids) and torch.equal(capped.labels, first.labels)


def test_batches_are_left_padded_with_positions_from_first_token(parts):
    model = make_model(parts, perturb=False)
    batch = vl_batch(model)
    assert batch.attention_mask[:, -1].all()                        # left padding: last column always real
    first = batch.attention_mask.argmax(dim=1)
    for row in range(batch.size):
        assert batch.position_ids[row, first[row]] == 0
        assert batch.labels[row, : first[row]].eq(IGNORE_INDEX).all()


def test_moving_a_batch_casts_pixels_only(parts):
    model = make_model(parts, perturb=False)
    batch = vl_batch(model)
    moved = batch.to("cpu", torch.bfloat16)
    assert moved.pixel_values is not None and moved.pixel_values.dtype == torch.bfloat16
    assert moved.input_ids.dtype == batch.input_ids.dtype and moved.audio is not None
    assert moved.audio.dtype == torch.float32 and moved.labels is not None and moved.labels.dtype == torch.long
    assert moved.ids == batch.ids and moved.kind == "vl" and moved.audio_features is None
    assert torch.equal(moved.input_ids, batch.input_ids) and torch.equal(moved.splice_pos, batch.splice_pos)
    names = []
    batch.map_tensors(lambda name, t: names.append(name) or t)
    assert names == ["input_ids", "attention_mask", "splice_pos", "labels", "pixel_values", "audio"]


# ---------------------------------------------------------------------------------- base equality


@pytest.mark.parametrize("fusion,lora", MODES)
def test_gate0_and_no_audio_are_bit_identical_to_base(parts, fusion, lora):
    pristine = parts[2]
    model = make_model(parts, fusion, lora)
    for batch in (vl_batch(model), caption_batch(model)):
        reference = base_logits(pristine, model, batch)
        with torch.no_grad():
            assert torch.equal(model(batch, gate=0.0).logits, reference)
            assert torch.equal(model(batch.with_audio(None), gate=1.0).logits, reference)
            safe = model(batch, gate=1.0)
        assert safe.safe_path
        # The SAFE path itself does change the output (so the equalities above are not vacuous).
        assert not torch.equal(safe.logits[:, -reference.shape[1]:], reference)
        # and the SAFE path leaves no state behind: the base alone is still the base afterwards
        assert torch.equal(base_logits(model.base, model, batch), reference)


def test_fresh_xattn_at_gate1_equals_base(parts):
    model = make_model(parts, "xattn", perturb=False)
    batch = vl_batch(model)
    with torch.no_grad():
        out = model(batch, gate=1.0)
    assert out.safe_path and torch.equal(out.logits, base_logits(parts[2], model, batch))


def test_prefix_inserts_k_tokens_after_user(parts):
    model = make_model(parts, "prefix")
    batch = caption_batch(model)
    with torch.no_grad():
        out = model(batch, gate=1.0)
    k = model.preset.num_audio_tokens
    assert out.logits.shape[1] == batch.input_ids.shape[1] + k
    assert torch.equal(out.labels[:, k:][:, -batch.labels.shape[1]:], batch.labels)   # labels moved right by k
    assert out.answer_logits().shape[0] == (batch.labels[:, 1:] != IGNORE_INDEX).sum()


# ------------------------------------------------------------------------------------------- training


def _step(model, optimizer, batch):
    out = model(batch, gate=1.0, label_smoothing=0.1)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    optimizer.step()
    return out.loss


@pytest.mark.parametrize("fusion,lora", [("xattn", 4), ("prefix", 4)])
def test_one_step_changes_only_trainable_parameters(parts, fusion, lora):
    model = make_model(parts, fusion, lora, perturb=False)
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.frozen_parameters().items()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    trainable = {n: p.detach().clone() for n, p in model.named_trainable_parameters().items()}
    optimizer = torch.optim.AdamW(model.param_groups(1e-3, 1e-3), lr=1e-3)
    _step(model, optimizer, caption_batch(model))
    for name, p in model.frozen_parameters().items():
        assert torch.equal(p, frozen[name]), name
        assert p.grad is None, name
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name]), name
    changed = [n for n, p in model.named_trainable_parameters().items() if not torch.equal(p, trainable[n])]
    assert changed and all(n in trainable for n in changed)
    assert model.base.training is False and model.audio_encoder.training is False


@pytest.mark.parametrize("fusion,lora", [("xattn", 4), ("prefix", 4)])
def test_all_trainable_parameters_get_gradients(parts, fusion, lora):
    model = make_model(parts, fusion, lora, perturb=False)
    model.train()
    optimizer = torch.optim.AdamW(model.param_groups(1e-2, 1e-2), lr=1e-2)
    for _ in range(3):
        _step(model, optimizer, caption_batch(model))
    model(caption_batch(model), gate=1.0).loss.backward()
    for name, p in model.named_trainable_parameters().items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_param_groups_split_projector_and_adapter_without_decay_on_norms(parts):
    model = make_model(parts, "xattn", 4, perturb=False)
    groups = {g["name"]: g for g in model.param_groups(2e-4, 1e-4, 0.01)}
    assert set(groups) == {"projector", "projector_no_decay", "adapter", "adapter_no_decay"}
    assert groups["projector"]["lr"] == 2e-4 and groups["adapter"]["lr"] == 1e-4
    alphas = [p for n, p in model.named_trainable_parameters().items() if n.endswith("alpha")]
    assert all(any(a is p for p in groups["adapter_no_decay"]["params"]) for a in alphas)
    assert groups["adapter_no_decay"]["weight_decay"] == 0.0
    total = sum(len(g["params"]) for g in groups.values())
    assert total == len(model.trainable_parameters())


# ----------------------------------------------------------------------------------------- generation


@pytest.mark.parametrize("fusion", ["xattn", "prefix"])
@pytest.mark.parametrize("num_beams", [1, 2])
def test_batched_generation_equals_one_by_one(parts, fusion, num_beams):
    model = make_model(parts, fusion)
    batch = vl_batch(model, answers=False)
    together = model.generate(batch, gate=1.0, max_new_tokens=4, num_beams=num_beams)
    alone = []
    for i in range(batch.size):
        single = model.builder.vqa_batch(images(3)[i:i + 1], QUESTIONS[i:i + 1], audio=batch.audio[i:i + 1])
        alone += model.generate(single, gate=1.0, max_new_tokens=4, num_beams=num_beams)
    assert together == alone
    assert len(together) == 3


def test_generate_returns_only_new_tokens_and_gate0_is_base(parts):
    model = make_model(parts, "xattn")
    batch = vl_batch(model, answers=False)
    inputs = model.base_inputs(batch)
    inputs.pop("position_ids")
    raw = parts[2].generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=model.builder.pad_id,
                            eos_token_id=model.tokenizer.eos_token_id)
    expected = [t.strip() for t in model.tokenizer.batch_decode(raw[:, batch.input_ids.shape[1]:],
                                                                skip_special_tokens=True)]
    assert model.generate(batch, gate=0.0, max_new_tokens=4) == expected
    assert model.generate(batch.with_audio(None), gate=1.0, max_new_tokens=4) == expected
    for text in model.generate(batch, gate=1.0, max_new_tokens=4):
        assert "USER" not in text and "ASSISTANT" not in text


def test_generate_refuses_a_batch_with_answers(parts):
    model = make_model(parts, "xattn")
    with pytest.raises(ValueError):
        model.generate(vl_batch(model), max_new_tokens=2)


# ------------------------------------------------------------------------------------ trainable state


@pytest.mark.parametrize("fusion,lora", [("xattn", 4), ("prefix", 0)])
def test_save_load_round_trip_gives_identical_logits(parts, fusion, lora, tmp_path):
    model = make_model(parts, fusion, lora)
    with torch.no_grad():
        for p in model.projector.parameters():
            p.add_(0.01)
    model.save_trainable(tmp_path / "ckpt")
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["safe_config.json", "trainable.safetensors"]
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "ckpt" / "trainable.safetensors"))
    assert set(saved) == set(model.named_trainable_parameters())           # never a frozen weight
    fresh = make_model(parts, fusion, lora, perturb=False)
    fresh.load_trainable(tmp_path / "ckpt")
    batch = vl_batch(model)
    with torch.no_grad():
        assert torch.equal(fresh(batch).logits, model(batch).logits)


def test_loading_mismatches_are_refused(parts, tmp_path):
    model = make_model(parts, "xattn")
    model.save_trainable(tmp_path / "ckpt")
    with pytest.raises(SafeError, match="fusion"):
        make_model(parts, "prefix").load_trainable(tmp_path / "ckpt")
    with pytest.raises(SafeError, match="num_audio_tokens"):
        make_model(parts, "xattn", num_audio_tokens=4).load_trainable(tmp_path / "ckpt")
    with pytest.raises(SafeError, match="layers"):
        make_model(parts, "xattn", xattn_layers=(0,)).load_trainable(tmp_path / "ckpt")
    tokenizer, processor, _, encoder = parts
    other_base = build_untrained(tokenizer, seed=5)                        # same shapes, other weights
    other = SAFEModel(other_base, processor, encoder, model.preset, base_name="test-tiny")
    with pytest.raises(SafeError, match="base model"):
        other.load_trainable(tmp_path / "ckpt")
    with pytest.raises(SafeError, match="no SAFE trainable state"):
        model.load_trainable(tmp_path / "nothing")


@pytest.mark.parametrize("fusion", ["xattn", "prefix"])
def test_bf16_base_with_fp32_trainable_parts(parts, fusion):
    """The GPU layout (frozen bf16 base, fp32 trainable weights) runs and keeps g = 0 exact."""
    tokenizer, processor, base, encoder = parts
    bf16_base = copy.deepcopy(base).to(torch.bfloat16)
    pristine = copy.deepcopy(bf16_base)
    model = SAFEModel(bf16_base, processor, encoder, get_preset("tiny", fusion=fusion, lora_rank=4), base_name="t")
    assert all(p.dtype == torch.float32 for p in model.trainable_parameters())
    batch = vl_batch(model)
    out = model(batch, gate=1.0)
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.projector.fc1.weight.grad is not None
    with torch.no_grad():
        assert torch.equal(model(batch, gate=0.0).logits, base_logits(pristine, model, batch))
    assert len(model.generate(vl_batch(model, answers=False), max_new_tokens=2, num_beams=2)) == 3


# ------------------------------------------------------------------------------ activation checkpointing


def _grads_and_saved_bytes(model, batch):
    """Trainable-parameter gradients of one loss, and the bytes autograd saved for the backward."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(batch, gate=1.0, label_smoothing=0.1)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_trainable_parameters().items() if p.grad is not None}
    return grads, sum(saved), out.logits.detach()


@pytest.mark.parametrize("fusion,lora", [("xattn", 0), ("xattn", 4), ("prefix", 0), ("prefix", 4)])
def test_activation_checkpointing_keeps_gradients_and_saves_less(parts, fusion, lora):
    from safe.models.checkpointing import enable_activation_checkpointing

    model = make_model(parts, fusion, lora)
    model.train()
    batch = caption_batch(model)
    plain, plain_bytes, plain_logits = _grads_and_saved_bytes(model, batch)
    assert enable_activation_checkpointing(model) == parts[2].config.text_config.num_hidden_layers
    checkpointed, checkpointed_bytes, logits = _grads_and_saved_bytes(model, batch)
    assert torch.equal(logits, plain_logits)
    assert plain.keys() == checkpointed.keys() and len(plain) == len(model.named_trainable_parameters())
    for name in plain:
        assert torch.equal(plain[name], checkpointed[name]), name
    assert checkpointed_bytes < 0.7 * plain_bytes, (checkpointed_bytes, plain_bytes)
    if lora:
        assert model.lora.on is False  # the recomputation left LoRA off outside the SAFE path
    # No-grad paths (teacher, generation) are untouched: the base at gate 0 still equals the bare base.
    with torch.no_grad():
        assert torch.equal(model(batch, gate=0.0).logits, base_logits(parts[2], model, batch))


def llama_style_tokenizer():
    """A real transformers LlamaTokenizer (byte-fallback BPE, "▁" word marks) over a small hand-made vocabulary:
    the sentencepiece behaviour of LLaVA-1.5's tokenizer, which the word-level toy tokenizer does not have."""
    from transformers import LlamaTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for char in sorted(set("▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:?")):
        vocab[char] = len(vocab)
    merges = []
    for word in ("▁USER", "▁ASSISTANT", "▁yes", "▁red"):
        piece = word[0]
        for char in word[1:]:
            if piece + char not in vocab:
                merges.append((piece, char))
                vocab[piece + char] = len(vocab)
            piece += char
    return LlamaTokenizer(vocab=vocab, merges=merges, legacy=True, add_prefix_space=True)


def test_an_empty_answer_is_supervised_as_eos_alone_under_a_sentencepiece_tokenizer():
    # A base that stops at once answers "": its KL target is EOS at the answer's first position, not the "▁" that
    # joining prompt + " " + "" tokenizes to.
    tokenizer = llama_style_tokenizer()
    prompt = TINY.caption()
    empty, yes = encode_examples(tokenizer, [prompt, prompt], ["", "yes"])
    supervised = [[t for t, label in zip(e.input_ids, e.labels) if label != IGNORE_INDEX] for e in (empty, yes)]
    assert supervised[0] == [tokenizer.eos_token_id]
    assert tokenizer.convert_ids_to_tokens(supervised[1]) == ["▁yes", "</s>"]
    assert empty.input_ids[: empty.prompt_len] == yes.input_ids[: yes.prompt_len] == tokenizer(prompt)["input_ids"]
