# toolsight: multi-stage build, small runtime image, non-root user.
#   docker build -t toolsight .
#   docker compose up    (PostgreSQL, Grafana with the dashboards, toolsight)

FROM rust:1.95-bookworm AS build
WORKDIR /src
# The dependencies first, from the manifests alone: this layer is built again only when they
# change, not on every change of the sources. (A workspace member must be present for the
# workspace to load; only the service is built.)
COPY Cargo.toml Cargo.lock ./
COPY loadgen/Cargo.toml ./loadgen/
RUN mkdir -p src loadgen/src \
    && echo 'fn main() {}' > src/main.rs && touch src/lib.rs loadgen/src/lib.rs \
    && cargo build --release --locked --bin toolsight \
    && rm -rf src loadgen/src
COPY src ./src
COPY migrations ./migrations
COPY alerts ./alerts
COPY loadgen/src ./loadgen/src
# Newer than the placeholders, whatever times the copied files carry. Not stripped: the release
# profile keeps line tables so that a panic's backtrace names the line.
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin toolsight

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
# `toolsight healthcheck` asks the admin port's /readyz (503 while the database is unreachable
# or a background task died): the container's health is the service's readiness.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["toolsight", "healthcheck", "--timeout", "5s"]
ENTRYPOINT ["toolsight"]
CMD ["serve"]
