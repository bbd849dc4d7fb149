"""bitsandbytes' CPU repacking of 4-bit layers (bnb >= 0.49 on CPUs with AVX512-BF16; docs/quantized.md, "Traps
handled"), on a tiny random nf4 Llama (fp32 compute):
(1) eval logits: unwrapped vs NEAT-wrapped with the adapter disabled, and against the unwrapped training-mode forward;
(2) peft LoRA: train -> one eval forward -> train; which LoRA tensors still get a gradient.
Run: python -m benchmarks.bnb_cpu_repacking (seconds; `grep -o avx512_bf16 /proc/cpuinfo` tells whether it applies).
"""
import tempfile
import warnings

warnings.simplefilter("ignore")
import torch
from transformers import LlamaConfig, LlamaForCausalLM, BitsAndBytesConfig
import bitsandbytes, peft
from neat_peft import NeatConfig, get_neat_model
torch.manual_seed(0)
d = tempfile.mkdtemp()
LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)).save_pretrained(d)
q = dict(dtype=torch.float32, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
         bnb_4bit_compute_dtype=torch.float32))
x = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
print("bitsandbytes", bitsandbytes.__version__, "peft", peft.__version__)
def rel(a, b): return ((a - b).abs().max() / b.abs().max()).item()
plain = LlamaForCausalLM.from_pretrained(d, **q).eval()
with torch.no_grad():
    train_like = plain.train()(input_ids=x).logits  # training path (no repack)
    plain.eval(); eval_plain = plain(input_ids=x).logits  # repacks on this forward if the CPU has AVX512-BF16
    eval_plain2 = plain(input_ids=x).logits
packed = [getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in plain.modules() if isinstance(m, bitsandbytes.nn.Linear4bit)]
print("unwrapped: Linear4bit layers repacked after an eval forward:", sum(packed), "of", len(packed))
print("unwrapped eval vs unwrapped train-mode forward, max rel diff:", rel(eval_plain2, train_like))
wrapped_base = LlamaForCausalLM.from_pretrained(d, **q)
neat = get_neat_model(wrapped_base, NeatConfig(r=4, target_modules=["q_proj", "v_proj"]))
neat.eval()
with torch.no_grad(), neat.disable_adapter():
    eval_wrapped = neat(input_ids=x).logits
print("NEAT-wrapped (adapter disabled) eval vs unwrapped eval, max rel diff:", rel(eval_wrapped, eval_plain2))
print("NEAT-wrapped (adapter disabled) eval vs unwrapped train-mode forward, max rel diff:", rel(eval_wrapped, train_like))
# (2) peft LoRA: train -> eval -> train
from peft import LoraConfig, get_peft_model
lora = get_peft_model(LlamaForCausalLM.from_pretrained(d, **q), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
def grads(m):
    m.train(); m.zero_grad(); m(input_ids=x, labels=x).loss.backward()
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad and p.grad is not None}, \
           sum(1 for n, p in m.named_parameters() if p.requires_grad)
g1, n = grads(lora)
lora.eval()
with torch.no_grad(): lora(input_ids=x)
packed = [getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in lora.modules() if isinstance(m, bitsandbytes.nn.Linear4bit)]
print("peft LoRA: repacked after an eval forward:", sum(packed), "of", len(packed))
g2, _ = grads(lora)
print(f"peft LoRA: trainable tensors {n}; with a gradient before eval: {len(g1)}, after train->eval->train: {len(g2)}")
lost = [k for k in g1 if k not in g2 or g2[k].abs().max() == 0]
print("peft LoRA: tensors whose gradient is gone or zero after the eval pass:", len(lost), lost[:4])
# (3) what unload() leaves: the switch stays off on the returned model's layers
plain_again = neat.unload()
flags = [m.support_avx512bf16_for_cpu for m in plain_again.modules() if isinstance(m, bitsandbytes.nn.Linear4bit)]
print("after NEAT's unload(): Linear4bit layers with the CPU kernel switched on:", sum(flags), "of", len(flags))
