# xraycls: a CPU/GPU image for ingestion, training and scoring.
# Build: docker build -t xraycls .      Run: docker run --rm -v $PWD/data:/data xraycls ingest /data --out /data/out
# Viewer: docker run --rm -p 8501:8501 -v $PWD/runs:/runs xraycls app --runs /runs --address 0.0.0.0
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    XRAYCLS_APP=/opt/xraycls/app/streamlit_app.py
WORKDIR /opt/xraycls
COPY pyproject.toml README.md ./
COPY xraycls ./xraycls
COPY app ./app
COPY configs ./configs
RUN pip install ".[app]"

# Pretrained weights are never downloaded at run time: mount them and point model.pretrained at them.
RUN useradd --create-home xraycls
USER xraycls
EXPOSE 8501
ENTRYPOINT ["xraycls"]
CMD ["--help"]
