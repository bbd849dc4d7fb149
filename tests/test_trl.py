"""NEAT in TRL's trainers, each run beside the same run with peft's LoraConfig: `peft_config=NeatConfig(...)` is
accepted (TRL type-checks it as a peft.PeftConfig), the adapter trains (loss down, B moved from its zero init), the
saved directory reloads with `AutoPeftModelForCausalLM` to the trained model's logits, and the layers are NEAT's.

Tiny random Llama (hidden 16, 2 layers) with SmolLM2's real tokenizer and chat template (tests/hf_tiny.py).
"""

import time

import pytest
import torch

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")

from hf_tiny import needs_tokenizer, save_base, tokenizer  # noqa: E402

import neat_peft  # noqa: E402
from neat_peft import NeatConfig, NeatLayer  # noqa: E402

pytestmark = needs_tokenizer
TARGETS = ["q_proj", "v_proj"]
METHODS = ["neat", "lora"]
# One batch of 4 rows (batch size 4): every step sees the same batch, so the logged losses are comparable.
TEXTS = ["the cat sat on the mat", "a dog ran in the park", "one two three four five six", "red green blue yellow"]
CHATS = [("What is 2 + 2?", "4"), ("Name a colour.", "Blue."), ("Say hi.", "Hi!"), ("Capital of France?", "Paris.")]


def peft_config(method):
    if method == "neat":  # scaling 4: Llama's std-0.02 weights make NEAT's H small; this trains in a few steps
        return NeatConfig(r=4, target_modules=TARGETS, scaling=4.0, task_type="CAUSAL_LM")
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM")


def args(config_cls, tmp_path, **kwargs):
    defaults = dict(output_dir=str(tmp_path / "run"), max_steps=8, per_device_train_batch_size=4,
                    learning_rate=2e-2, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                    disable_tqdm=True, seed=0, bf16=False)  # TRL defaults to bf16 autocast where supported
    return config_cls(**{**defaults, **kwargs})


@pytest.fixture
def base(tmp_path):
    from transformers import AutoModelForCausalLM

    path = save_base(tmp_path / "base", tokenizer())
    return AutoModelForCausalLM.from_pretrained(path)


def adapter_state(model):
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def check_layers(model, method):
    neat = [m for m in model.modules() if isinstance(m, NeatLayer)]
    lora = [m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert (len(neat), len(lora)) == ((4, 0) if method == "neat" else (0, 4))  # q and v in 2 layers


def check_trained(before, model):
    after = adapter_state(model)
    assert before.keys() == after.keys() and before
    ups = [k for k in after if "neat_B" in k or "lora_B" in k]
    assert ups and all(before[k].abs().max() == 0 and after[k].abs().max() > 0 for k in ups)  # zero init, moved
    assert all(not torch.equal(before[k], after[k]) for k in after)


def check_reload(trainer, tmp_path, method, **base_kwargs):
    """Saved adapter -> AutoPeftModelForCausalLM(dir) -> the trained model's logits, exactly."""
    out = tmp_path / "adapter"
    trainer.save_model(str(out))
    reloaded = peft.AutoPeftModelForCausalLM.from_pretrained(str(out), **base_kwargs).eval()
    check_layers(reloaded, method)
    ids = tokenizer()(["the cat ran to the park"], return_tensors="pt")["input_ids"]
    model = trainer.model.eval()
    for param in model.parameters():  # TRL trains a quantized base's adapter in bf16; peft reloads it in fp32
        if param.requires_grad:
            param.data = param.data.float()
    with torch.no_grad():
        expected, actual = model(input_ids=ids).logits, reloaded(input_ids=ids).logits
        with model.disable_adapter():
            base_logits = model(input_ids=ids).logits
    assert (expected - base_logits).abs().max() > 1e-4  # the trained adapter changes the outputs
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)


def losses(trainer):
    """The logged training losses; the first is the untrained model's (logged before the first update)."""
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


def sft(base, tmp_path, method, dataset, reload_kwargs=None, **kwargs):
    from datasets import Dataset

    trainer = trl.SFTTrainer(model=base, args=args(trl.SFTConfig, tmp_path, max_length=64, **kwargs),
                             train_dataset=Dataset.from_list(dataset), processing_class=tokenizer(),
                             peft_config=peft_config(method))
    check_layers(trainer.model, method)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    before = adapter_state(trainer.model)
    trainer.train()
    assert losses(trainer)[-1] < losses(trainer)[0] - 0.1, losses(trainer)
    check_trained(before, trainer.model)
    check_reload(trainer, tmp_path, method, **(reload_kwargs or {}))
    return trainer, batch


@pytest.mark.parametrize("method", METHODS)
def test_sft_plain_text(method, base, tmp_path):
    config = peft_config(method)
    assert isinstance(config, peft.PeftConfig)
    sft(base, tmp_path, method, [{"text": t} for t in TEXTS])


@pytest.mark.parametrize("method", METHODS)
def test_sft_chat_completion_only_loss(method, base, tmp_path):
    """Conversational prompt/completion rows: only the assistant's tokens carry labels (the chat-templated prompt,
    system message included, is -100), checked token by token against the template itself."""
    rows = [{"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}
            for q, a in CHATS]
    trainer, batch = sft(base, tmp_path, method, rows, completion_only_loss=True)
    tok = tokenizer()
    for i, row in enumerate(rows):
        prompt = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
        full = tok.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
        n_prompt, n_full = len(tok(prompt)["input_ids"]), len(tok(full)["input_ids"])
        ids, labels = batch["input_ids"][i], batch["labels"][i]
        assert ids[:n_full].tolist() == tok(full)["input_ids"]
        assert (labels[:n_prompt] == -100).all()  # the prompt is masked
        assert torch.equal(labels[n_prompt:n_full], ids[n_prompt:n_full])  # the completion is learned
        assert "<|im_start|>assistant" in tok.decode(ids[:n_prompt]) and row["completion"][0]["content"] in \
            tok.decode(ids[n_prompt:n_full])


@pytest.mark.parametrize("method", METHODS)
def test_dpo(method, base, tmp_path):
    """DPO with the adapter-disabled model as reference: the first loss is ln 2 exactly (B = 0 at init, so policy
    = reference), and it goes down."""
    from datasets import Dataset

    rows = [{"prompt": q, "chosen": " " + a, "rejected": " I do not know."} for q, a in CHATS]
    trainer = trl.DPOTrainer(model=base, args=args(trl.DPOConfig, tmp_path, max_length=48),
                             train_dataset=Dataset.from_list(rows), processing_class=tokenizer(),
                             peft_config=peft_config(method))
    check_layers(trainer.model, method)
    before = adapter_state(trainer.model)
    trainer.train()
    logged = losses(trainer)
    assert abs(logged[0] - 0.6931) < 1e-3 and logged[-1] < logged[0] - 0.05, logged
    check_trained(before, trainer.model)
    check_reload(trainer, tmp_path, method)


@pytest.mark.parametrize("method", METHODS)
def test_grpo(method, base, tmp_path):
    """GRPO, reward = share of completion tokens that are the letter 'a' (so the reward has a gradient to follow)."""
    from datasets import Dataset

    def reward(completions, **kwargs):
        return [text.count("a") / max(len(text), 1) for text in completions]

    rows = [{"prompt": q} for q, _ in CHATS]
    start = time.perf_counter()
    trainer = trl.GRPOTrainer(model=base, reward_funcs=reward, train_dataset=Dataset.from_list(rows),
                              processing_class=tokenizer(), peft_config=peft_config(method),
                              args=args(trl.GRPOConfig, tmp_path, max_steps=4, num_generations=4,
                                        per_device_train_batch_size=4, max_completion_length=8))
    check_layers(trainer.model, method)
    before = adapter_state(trainer.model)
    trainer.train()
    check_trained(before, trainer.model)
    check_reload(trainer, tmp_path, method)
    assert time.perf_counter() - start < 60


@pytest.mark.parametrize("method", METHODS)
def test_sft_on_a_4bit_base_qlora_recipe(method, tmp_path):
    """QLoRA's recipe with NEAT: bitsandbytes nf4 base, prepare_model_for_kbit_training, SFT, save, reload.
    No forward runs before training: bitsandbytes' CPU path repacks a 4-bit weight on its first eval forward, and
    the repacked forward has no gradient to its input, so peft's LoRA stays at B = 0 after one (seen here: loss
    unchanged, grad_norm 0). NEAT turns the repacking off (quantized.prepare_model), which is also why a NEAT-wrapped
    nf4 model with B = 0 differs from the bare model's repacked eval kernel (up to 0.08 in these logits)."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = save_base(tmp_path / "base", tokenizer(), hidden=64)  # bitsandbytes' CPU 4-bit kernel needs N % 64 == 0
    nf4 = dict(quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                      bnb_4bit_compute_dtype=torch.float32), device_map="cpu")
    quantized = peft.prepare_model_for_kbit_training(AutoModelForCausalLM.from_pretrained(path, **nf4),
                                                     use_gradient_checkpointing=False)
    trainer, _ = sft(quantized, tmp_path, method, [{"text": t} for t in TEXTS], reload_kwargs=nf4)
    import bitsandbytes as bnb

    layers = [m for m in trainer.model.modules() if isinstance(m, (NeatLayer, peft.tuners.lora.LoraLayer))]
    assert all(isinstance(m.base_layer, bnb.nn.Linear4bit) for m in layers)


def test_neat_config_is_a_peft_config():
    config = NeatConfig(r=4, target_modules=TARGETS)
    assert isinstance(config, peft.PeftConfig) and isinstance(config, NeatConfig) and config.peft_type == "NEAT"
    assert type(config) is neat_peft.register_with_peft()
