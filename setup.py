"""megatron_emu: 3D-parallel pretraining of Emu (EVA-CLIP -> Causal Former -> LLaMA)."""

from setuptools import find_packages, setup

setup(
    name="megatron_emu",
    version="0.1.0",
    description="Megatron-style training system for the Emu multimodal model",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_emu", "megatron_emu.*"]),
    py_modules=["pretrain_emu", "finetune_decoder"],
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.16,<0.17",
        "numpy>=1.26",
        "sentencepiece>=0.2",
        "safetensors>=0.4",
        "tqdm>=4.66",
        "pillow>=10.0",
        # checksums of checkpoint and dataset files (xxh3: several GB/s per core)
        "xxhash>=3.4",
        # JPEG-stored images are decoded in the loader's workers (libjpeg-turbo)
        "simplejpeg>=1.7",
    ],
    extras_require={
        "decoder": ["diffusers>=0.30", "transformers>=4.45"],
        # tools/convert_checkpoint.py: transformers needs protobuf to turn a sentencepiece
        # model into a Hugging Face tokenizer.
        "hf": ["transformers>=4.45", "protobuf>=4.0", "peft>=0.11"],  # peft: loading --to peft adapters
        # tools/generate_text.py: transformers' logits processors (repetition penalty, top-k/p, temperature)
        "generate": ["transformers>=4.45"],
        # tools/evaluate.py: COCO caption scorers (CIDEr, BLEU; METEOR / SPICE with Java), Porter
        # stemming of OK-VQA answers, transformers' logits processors for decoding
        "evaluate": ["pycocoevalcap>=1.2", "nltk>=3.8", "transformers>=4.45"],
        # tools/evaluate.py --task coco_fid: the FID Inception-v3 (weights from a local file). It needs
        # torchvision, which replaces a CPU torch with a CUDA build: never part of `test`.
        "fid": ["torch-fidelity>=0.3"],
        "video": ["av>=12.0"],  # decoding video files in tools/preprocess_data.py
        "parquet": ["pyarrow>=15.0"],  # parquet inputs in tools/preprocess_data.py
        # watching a run: --tensorboard-dir, --wandb-project, tools/plot_logs.py
        "monitor": ["tensorboard>=2.16", "wandb>=0.17", "matplotlib>=3.8"],
        # pytest plus what the tests import: transformers + protobuf (HF parity and
        # conversion), diffusers (decoder), the evaluation's scorers,
        # av / pyarrow: the video-file and parquet readers of tools/preprocess_data.py.
        "test": ["pytest>=8.0", "transformers>=4.45", "peft>=0.11", "protobuf>=4.0", "diffusers>=0.30", "av>=12.0", "pyarrow>=15.0",
                 "tensorboard>=2.16", "wandb>=0.17", "matplotlib>=3.8",
                 # evaluation: the caption scorers, OK-VQA stemming, scipy for pytorch-fid's reference formula
                 "pycocoevalcap>=1.2", "nltk>=3.8", "scipy>=1.11"],
        # CUDA-only kernels. NVIDIA apex comes with the NGC PyTorch container; the
        # registry's package named `apex` is unrelated and must never be installed.
        "gpu": ["flash-attn>=2.5", "transformer-engine[pytorch]>=1.9"],
    },
)
