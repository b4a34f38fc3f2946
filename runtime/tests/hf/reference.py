"""Reference outputs from Hugging Face Transformers for the runtime's HF tests.

    python reference.py make OUT          tiny random models (saved with save_pretrained) and,
                                          for each, OUT/<name>/reference.safetensors: ids,
                                          logits, loss, a greedy generation
    python reference.py logits DIR IDS OUT  logits of the model in DIR (loaded with
                                          from_pretrained) for the ids in the JSON file IDS
    python reference.py tokenizer TEXT OUT  a byte-level BPE tokenizer.json trained on TEXT
    python reference.py encode TOK JSONL OUT  ids of every document of JSONL, by the Python
                                          tokenizers package (with an EOS after each)
    python reference.py vision OUT        a tiny SigLIP vision model (SiglipVisionModel,
                                          save_pretrained, with its image processor's
                                          preprocessor_config.json), frame images (PNG at the
                                          encoder's size, JPEG and PNG larger), a manifest, and
                                          OUT/pixels.safetensors: SiglipImageProcessor's pixels
                                          of each frame
    python reference.py megatron IDS PREFIX  Megatron-LM's indexed dataset (megatron-core's
                                          IndexedDatasetBuilder, uint16) of the documents
                                          (lists of ids) in the JSON file IDS

Everything runs in float32 on the CPU with eager attention, so the runtime's float32 CPU path
can be held to 1e-5.
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    max_position_embeddings=256,
    hidden_act="silu",
    bos_token_id=1,
    eos_token_id=2,
)


def perturb(model, seed):
    """Norm weights and biases away from their initial ones and zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def cases():
    llama3 = LlamaConfig(
        **COMMON,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    )
    qwen_tied = Qwen2Config(
        **COMMON,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        use_sliding_window=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    )
    qwen_yarn = Qwen2Config(
        **COMMON,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        use_sliding_window=False,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 1000000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )
    llama_linear = LlamaConfig(
        **COMMON,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    )
    return [
        ("llama3", LlamaForCausalLM, llama3, "100KB"),
        ("qwen2_tied", Qwen2ForCausalLM, qwen_tied, None),
        ("qwen2_yarn", Qwen2ForCausalLM, qwen_yarn, None),
        ("llama_linear", LlamaForCausalLM, llama_linear, None),
    ]


def make(out):
    for i, (name, cls, cfg, shard) in enumerate(cases()):
        cfg._attn_implementation = "eager"
        torch.manual_seed(100 + i)
        model = cls(cfg).float().eval()
        perturb(model, 200 + i)
        d = os.path.join(out, name)
        kw = {"max_shard_size": shard} if shard else {}
        model.save_pretrained(d, **kw)
        g = torch.Generator().manual_seed(300 + i)
        ids = torch.randint(3, cfg.vocab_size, (1, 64), generator=g)
        with torch.no_grad():
            res = model(ids, labels=ids)
            prompt = ids[:, :16]
            gen = model.generate(
                prompt, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0
            )
        save_file(
            {
                "ids": ids.contiguous(),
                "logits": res.logits.float().contiguous(),
                "loss": res.loss.reshape(1).float(),
                "generated": gen[0, 16:].contiguous(),
            },
            os.path.join(d, "reference.safetensors"),
        )
        if name == "llama_linear":
            v4_copy(d, os.path.join(out, "llama_linear_v4"), ids)


def v4_copy(src, dst, ids):
    """The same weights with a Transformers 4.x config.json (top-level rope_theta and a
    rope_scaling of "type" linear): the reference is Transformers' reading of that config."""
    import shutil

    shutil.copytree(src, dst, dirs_exist_ok=True)
    cfg = json.load(open(os.path.join(dst, "config.json")))
    rp = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rp["rope_theta"]
    cfg["rope_scaling"] = {"type": "linear", "factor": rp["factor"]}
    cfg["torch_dtype"] = cfg.pop("dtype")
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"), indent=2)
    model = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        res = model(ids, labels=ids)
        gen = model.generate(ids[:, :16], max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    save_file(
        {
            "ids": ids.contiguous(),
            "logits": res.logits.float().contiguous(),
            "loss": res.loss.reshape(1).float(),
            "generated": gen[0, 16:].contiguous(),
        },
        os.path.join(dst, "reference.safetensors"),
    )


def logits(model_dir, ids_file, out):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.tensor(json.load(open(ids_file)), dtype=torch.int64).reshape(1, -1)
    with torch.no_grad():
        lg = model(ids).logits.float().contiguous()
    save_file({"logits": lg}, out)


def tokenizer(text_file, out):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=COMMON["vocab_size"],
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train([text_file], trainer)
    tok.save(out)


def encode(tok_file, jsonl, out):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tok_file)
    ids = []
    for line in open(jsonl):
        if line.strip():
            ids += tok.encode(json.loads(line)["text"]).ids + [COMMON["eos_token_id"]]
    json.dump(ids, open(out, "w"))


def vision(out):
    import numpy as np
    from PIL import Image
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    os.makedirs(os.path.join(out, "model"), exist_ok=True)
    os.makedirs(os.path.join(out, "frames"), exist_ok=True)
    cfg = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, patch_size=8, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
    )
    torch.manual_seed(7)
    SiglipVisionModel(cfg).save_pretrained(os.path.join(out, "model"))
    proc = SiglipImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    proc.save_pretrained(os.path.join(out, "model"))
    rng = np.random.default_rng(3)
    names = []
    for i in range(7):
        if i < 4:
            size, ext = (32, 32), "png"
        else:
            size, ext = ((64, 48), "jpg") if i % 2 else ((80, 80), "png")
        yy, xx = np.mgrid[0 : size[1], 0 : size[0]]
        base = np.stack([xx * 3 + i * 20, yy * 5, (xx + yy) * 2], -1) % 256
        arr = (0.7 * base + 0.3 * rng.integers(0, 256, base.shape)).astype(np.uint8)
        name = f"frames/f{i}.{ext}"
        Image.fromarray(arr).save(os.path.join(out, name))
        names.append(name)
    px = {}
    for i, n in enumerate(names):
        img = Image.open(os.path.join(out, n)).convert("RGB")
        px[f"px{i}"] = proc(images=img, return_tensors="pt")["pixel_values"][0].float().contiguous()
    save_file(px, os.path.join(out, "pixels.safetensors"))
    lines = [
        {"frames": names[:3], "text": "It was the best of times, it was the worst of times."},
        {"frames": names[3:4], "prompt": "Call me", "completion": " Ishmael. Some years ago."},
        {"frames": names[4:], "text": "We the People of the United States."},
    ]
    with open(os.path.join(out, "manifest.jsonl"), "w") as f:
        for l in lines:
            f.write(json.dumps(l) + "\n")


def megatron(ids_file, prefix):
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for doc in json.load(open(ids_file)):
        b.add_document(torch.tensor(doc, dtype=torch.int64), [len(doc)])
    b.finalize(prefix + ".idx")


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"make": make, "logits": logits, "tokenizer": tokenizer, "encode": encode, "megatron": megatron, "vision": vision}[cmd](*args)
