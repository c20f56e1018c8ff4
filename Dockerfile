# toolsight: multi-stage build, small runtime image, non-root user.
#   docker build -t toolsight .
#   docker compose up    (PostgreSQL, Grafana with the dashboards, toolsight)

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY migrations ./migrations
COPY alerts ./alerts
# A workspace member must be present for the workspace to load; only the service is built.
COPY loadgen ./loadgen
RUN cargo build --release --locked && strip target/release/toolsight

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin toolsight
COPY --from=build /src/target/release/toolsight /usr/local/bin/toolsight
COPY alerts /etc/toolsight/alerts
USER 10001:10001
# Inside a container the listeners must bind all interfaces; publish only what you need.
ENV TOOLSIGHT_OTLP__GRPC_LISTEN=0.0.0.0:4317 \
    TOOLSIGHT_OTLP__HTTP_LISTEN=0.0.0.0:4318 \
    TOOLSIGHT_ADMIN__LISTEN=0.0.0.0:9464 \
    TOOLSIGHT_LOG__FORMAT=json
EXPOSE 4317 4318 9464
ENTRYPOINT ["toolsight"]
CMD ["serve"]
