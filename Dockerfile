# NGC PyTorch carries CUDA, NCCL, NVIDIA apex, Transformer Engine and flash-attn.
FROM nvcr.io/nvidia/pytorch:25.01-py3

WORKDIR /workspace/megatron_emu
COPY . .
# The [gpu] extra is already satisfied by the base image; pip only checks it.
# torch is the container's own build: no reinstall.
RUN pip install --no-cache-dir -e ".[gpu,decoder]"

ENV MEGATRON_EMU_CACHE=/workspace/cache
CMD ["python", "pretrain_emu.py", "--help"]
