"""Checkpoint conversion between our DCP checkpoints and public formats.

keys.py             name mappings (ours <-> transformers LLaMA, EVA-CLIP release, Emu v1 release)
hf_llama_config.py  our LLaMAConfig <-> transformers config.json: every field carried or refused
hf_emu.py           the export's layout (LlamaForCausalLM dir + visual/), read back and reloaded
streams.py          streaming readers / writers (DCP, safetensors shards, torch files), atomic output
export.py           ours -> Hugging Face (LlamaForCausalLM dir + tokenizer + visual side)
imports.py          Hugging Face LLaMA / EVA-CLIP / Emu v1 / our HF export -> our DCP checkpoint
"""
