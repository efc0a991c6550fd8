# hyrank's job image: the pinned stack exactly as scripts/bootstrap.sh installs it, then this checkout at /app (the
# WORKDIR: the run configs' relative paths data/ and runs/ are the volumes .torchxconfig mounts there).
#
#   docker build -t hyrank:0.1.0 .                                          # CPU: fbgemm-gpu-cpu
#   docker build --build-arg FBGEMM=fbgemm-gpu -t hyrank:0.1.0-cuda .       # CUDA GPUs: fbgemm-gpu
#   docker run --rm hyrank:0.1.0 hyrank --help
#
# The CUDA variant differs only in the fbgemm wheel: torch's own wheels bring the CUDA libraries and the host's
# NVIDIA container runtime brings the driver. tests/test_jobs.py checks that every pin here is the project's.
FROM python:3.11-slim

# fbgemm-gpu-cpu or fbgemm-gpu: the choice scripts/bootstrap.sh makes from nvidia-smi, made here at build time
ARG FBGEMM=fbgemm-gpu-cpu
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /app

# The stack first, in a layer that changes only with the pins. torchrec goes in with --no-deps: it declares the CUDA
# fbgemm-gpu wheel, which must not replace fbgemm-gpu-cpu (embeddings/versions.py checks the triple at import).
COPY requirements/base.txt requirements/base.txt
RUN case "$FBGEMM" in fbgemm-gpu|fbgemm-gpu-cpu) ;; *) echo "FBGEMM: fbgemm-gpu or fbgemm-gpu-cpu" >&2; exit 1;; esac \
 && pip install -r requirements/base.txt "$FBGEMM==1.8.0" \
 && pip install --no-deps torchrec==1.8.0

COPY pyproject.toml README.md .torchxconfig ./
COPY pipeline pipeline
COPY models models
COPY embeddings embeddings
COPY jobs jobs
COPY bench bench
COPY hyrank hyrank
RUN pip install --no-deps --no-build-isolation -e . \
 && python -c "import hyrank.embeddings.versions as v; v.check_versions()"

CMD ["hyrank", "--help"]
