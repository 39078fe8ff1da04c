-- One PostgreSQL for the services: MLflow's runs and registry, MLflow's users (basic auth), Prefect.
-- Runs once, when the data volume is created.
CREATE DATABASE mlflow;
CREATE DATABASE mlflow_auth;
CREATE DATABASE prefect;
