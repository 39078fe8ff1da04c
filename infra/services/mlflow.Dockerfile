# syntax=docker/dockerfile:1
# The MLflow tracking server: the client's version and dependencies (constraints.txt), the basic-auth app,
# PostgreSQL (psycopg2) and S3/MinIO (boto3) drivers. Built by compose.yaml from the repository root.
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 MLFLOW_DISABLE_TELEMETRY=true
COPY constraints.txt /tmp/constraints.txt
RUN pip install -c /tmp/constraints.txt "mlflow[auth]==3.17.2" psycopg2-binary==2.9.13 boto3==1.44.5 \
 && rm /tmp/constraints.txt
COPY infra/services/basic_auth.ini /etc/mlflow/basic_auth.ini
RUN useradd --uid 1000 mlflow
USER mlflow
EXPOSE 5000
