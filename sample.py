"""Sample from a tst checkpoint: nanoGPT's sample.py, on Transformer.generate.

    python sample.py --ckpt RUN/ckpt.pt --prompt "It was a dark and stormy night"
    python sample.py --ckpt RUN/ckpt.pt --prompt "def main(" --num_samples 3 --temperature 0.8 --top_k 50
    python sample.py --ckpt RUN/ckpt.pt --prompt "The capital of France is" --temperature 0   # greedy

The prompt is read as the start of a document: after the tokenizer's document_prefix (end-of-text, then BOS where
the tokenizer has one), where every training document starts. A sample ends after max_new_tokens or at the
end-of-text token, which is not printed. The same --seed gives the same samples on the same device.
"""

import argparse

import torch

import checkpoint
import cli
from cli import non_negative_float, non_negative_int, positive_int, torch_device


def sample(model, tok, prompt, max_new_tokens=200, temperature=0.8, top_k=50, generator=None):
    """The text that follows `prompt` at the start of a document; temperature 0 is greedy."""
    ids = model.generate(tok.document_prefix + tok.encode(prompt), max_new_tokens, temperature, top_k, generator,
                         stop=tok.eot)
    return tok.decode(ids[:-1] if ids and ids[-1] == tok.eot else ids)


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="a checkpoint written by train.py (file or FSDP folder)")
    p.add_argument("--prompt", default="", help="the text to continue (default: a document from its start)")
    p.add_argument("--num_samples", type=positive_int, default=1)
    p.add_argument("--max_new_tokens", type=non_negative_int, default=200)
    p.add_argument("--temperature", type=non_negative_float, default=0.8, help="0: greedy")
    p.add_argument("--top_k", type=non_negative_int, default=50, help="0: no top-k cut")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    device = torch_device(args.device)
    model, state = checkpoint.load_model(args.ckpt, device)
    tok = checkpoint.run_tokenizer(state["config"])
    generator = torch.Generator(device=device).manual_seed(args.seed)  # one stream: sample k depends on the seed only
    for k in range(args.num_samples):
        if k:
            print("---------------")
        print(args.prompt + sample(model, tok, args.prompt, args.max_new_tokens, args.temperature, args.top_k,
                                   generator), flush=True)


if __name__ == "__main__":
    cli.run(main)
