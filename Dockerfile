# The GPU image launch/jobset.yaml runs:  docker build -t ghcr.io/your-org/dsa-train:latest .
# The jax[cuda13] wheels bring their own CUDA libraries; the host provides only the driver
# (NVIDIA container toolkit), so a plain Python base image is enough.
FROM python:3.12-slim
WORKDIR /opt/dsa-train
COPY pyproject.toml README.md ./
COPY dsa_train ./dsa_train
RUN pip install --no-cache-dir ".[cuda13,gcs]"
COPY configs ./configs
COPY recipes ./recipes
COPY launch ./launch
ENV XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
CMD ["dsa-train", "--help"]
