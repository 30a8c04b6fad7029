# The image KubeRay (configs/kuberay/) and container-based clusters run: Ray 2.60 (Python 3.11, CUDA) + ray-rerank.
#   docker build -t REGISTRY/ray-rerank:0.1.0 . && docker push REGISTRY/ray-rerank:0.1.0
FROM rayproject/ray:2.60.0-py311-gpu

WORKDIR /home/ray/ray-rerank
COPY --chown=ray:users pyproject.toml constraints.txt README.md LICENSE ./
# torch first and pinned (the CUDA build on Linux), then the project against the known-good constraints.
RUN pip install --no-cache-dir torch==2.13.0
COPY --chown=ray:users reranker reranker
COPY --chown=ray:users jobs jobs
COPY --chown=ray:users serve serve
COPY --chown=ray:users configs configs
RUN pip install --no-cache-dir -c constraints.txt -e ".[s3,gcs,eval]"

# Model weights are cached here on first load; mount a volume at this path to keep them across pods.
ENV HF_HOME=/home/ray/.cache/huggingface
# The proxy middleware (serve/proxy.py) is not baked in: the RayService pods, cluster.yaml and `python -m serve` set it.
