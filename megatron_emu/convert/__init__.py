"""Checkpoint conversion between our DCP checkpoints and public formats.

keys.py     name mappings (ours <-> transformers LLaMA, EVA-CLIP release, Emu v1 release)
streams.py  streaming readers / writers (DCP, safetensors shards, torch files), atomic output
export.py   ours -> Hugging Face (LlamaForCausalLM dir + tokenizer + visual side), reload
imports.py  Hugging Face LLaMA / EVA-CLIP / Emu v1 / our HF export -> our DCP checkpoint
"""
