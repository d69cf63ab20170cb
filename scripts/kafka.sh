#!/usr/bin/env bash
# Run a real Apache Kafka broker locally for Stratoscope's tests and for users:
# one combined broker+controller node in KRaft mode, on loopback only.
#
#   scripts/kafka.sh start    fetch Kafka (first time only), format, start, wait until it serves
#   scripts/kafka.sh stop     stop it (TERM, then KILL after 20 s) and remove its data dir
#   scripts/kafka.sh status   exit 0 if it is running and answers, non-zero otherwise
#   scripts/kafka.sh env      print KAFKA_BOOTSTRAP=127.0.0.1:<port>
#   scripts/kafka.sh halt     stop it but keep its data: the next `resume` serves the same topics
#   scripts/kafka.sh resume   start it again on the data a `halt` kept (a broker outage, for tests)
#
# Environment overrides:
#   KAFKA_VERSION     org.apache.kafka:kafka_2.13 version from Maven Central (default 4.4.0)
#   KAFKA_PORT        client (PLAINTEXT) port; the controller listens on KAFKA_PORT+1 (default 19092)
#   KAFKA_HOME_CACHE  where the jars are cached, outside the repo
#                     (default ${XDG_CACHE_HOME:-$HOME/.cache}/stratoscope/kafka-$KAFKA_VERSION)
#   KAFKA_DATA        config, logs, pid and partitions (default /tmp/stratoscope-kafka-$KAFKA_PORT)
#   KAFKA_START_TIMEOUT  seconds to wait for the broker to serve (default 90)
#   KAFKA_SASL_PORT   also serve SASL_PLAINTEXT (mechanism PLAIN) on this port (default: none)
#   KAFKA_SASL_USERS  the SASL users, space-separated user=password pairs (with KAFKA_SASL_PORT)
#
# The broker is obtained with Maven (the jar and its runtime dependencies), so only
# Maven Central has to be reachable. Everything here is idempotent.
set -euo pipefail

KAFKA_VERSION="${KAFKA_VERSION:-4.4.0}"
KAFKA_PORT="${KAFKA_PORT:-19092}"
KAFKA_HOME_CACHE="${KAFKA_HOME_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/stratoscope/kafka-$KAFKA_VERSION}"
KAFKA_DATA="${KAFKA_DATA:-/tmp/stratoscope-kafka-$KAFKA_PORT}"
KAFKA_START_TIMEOUT="${KAFKA_START_TIMEOUT:-90}"
KAFKA_SASL_PORT="${KAFKA_SASL_PORT:-}"
KAFKA_SASL_USERS="${KAFKA_SASL_USERS:-}"
# Used only when Kafka's own dependencies do not already bring a log4j2 binding.
LOG4J_FALLBACK_VERSION="${LOG4J_FALLBACK_VERSION:-2.24.3}"
DEP_PLUGIN_VERSION="3.8.1"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HOST=127.0.0.1
CONTROLLER_PORT=$((KAFKA_PORT + 1))
LIBS="$KAFKA_HOME_CACHE/libs"
STAMP="$KAFKA_HOME_CACHE/.complete"
CONFIG="$KAFKA_DATA/server.properties"
LOG4J_CONFIG="$KAFKA_DATA/log4j2.xml"
PIDFILE="$KAFKA_DATA/kafka.pid"
SERVER_LOG="$KAFKA_DATA/logs/server.log"
STDOUT_LOG="$KAFKA_DATA/logs/stdout.log"
BOOTSTRAP="$HOST:$KAFKA_PORT"

log() { printf '[kafka] %s\n' "$*" >&2; }

# Print the last 30 lines of whatever the broker wrote, to stderr.
show_logs() {
  local f
  for f in "$SERVER_LOG" "$STDOUT_LOG"; do
    if [ -s "$f" ]; then
      printf -- '--- last 30 lines of %s ---\n' "$f" >&2
      tail -n 30 "$f" >&2
    fi
  done
}

# One-line reason, then the broker's log tail when asked, then exit non-zero.
die() { printf '[kafka] ERROR: %s\n' "$1" >&2; [ "${2:-}" = logs ] && show_logs; exit 1; }

case "$KAFKA_PORT" in '' | *[!0-9]*) die "KAFKA_PORT must be a number, got '$KAFKA_PORT'" ;; esac
[ "$KAFKA_PORT" -ge 1 ] && [ "$KAFKA_PORT" -le 65534 ] || die "KAFKA_PORT must be 1..65534 (the controller takes KAFKA_PORT+1), got $KAFKA_PORT"
if [ -n "$KAFKA_SASL_PORT" ]; then
  case "$KAFKA_SASL_PORT" in *[!0-9]*) die "KAFKA_SASL_PORT must be a number, got '$KAFKA_SASL_PORT'" ;; esac
  [ -n "$KAFKA_SASL_USERS" ] || die "KAFKA_SASL_PORT needs KAFKA_SASL_USERS (user=password ...)"
  for pair in $KAFKA_SASL_USERS; do
    case "$pair" in [A-Za-z0-9_]*=?*) ;; *) die "KAFKA_SASL_USERS: expected user=password pairs" ;; esac
    case "$pair" in *[\"\\]*) die "KAFKA_SASL_USERS: no quotes or backslashes in a pair" ;; esac
  done
fi

pick_python() {
  if [ -x "$ROOT/.venv/bin/python" ]; then echo "$ROOT/.venv/bin/python"
  elif command -v python3 >/dev/null 2>&1; then command -v python3
  else echo ""; fi
}
PYTHON="$(pick_python)"

# --- tools ----------------------------------------------------------------------
java_major() {
  java -version 2>&1 | awk -F'"' '/version/ { split($2, v, "."); print (v[1] == "1" ? v[2] : v[1]); exit }'
}

ensure_tools() {
  local need=()
  command -v java >/dev/null 2>&1 || need+=(default-jdk-headless)
  command -v mvn >/dev/null 2>&1 || need+=(maven)
  if [ ${#need[@]} -gt 0 ]; then
    [ "$(id -u)" -eq 0 ] || die "missing ${need[*]}; install them (apt-get install ${need[*]}) or run as root"
    log "installing ${need[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || die "apt-get update failed"
    apt-get install -y -qq "${need[@]}" >/dev/null || die "apt-get install ${need[*]} failed"
  fi
  local major
  major="$(java_major)"
  [ -n "$major" ] && [ "$major" -ge 17 ] || die "Kafka $KAFKA_VERSION needs Java 17 or newer; 'java' here is version '${major:-unknown}'"
}

# --- fetching Kafka with Maven ---------------------------------------------------
write_pom() { # $1 = dir, $2 = extra <dependency> xml
  cat >"$1/pom.xml" <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0"
         xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
         xsi:schemaLocation="http://maven.apache.org/POM/4.0.0 http://maven.apache.org/xsd/maven-4.0.0.xsd">
  <modelVersion>4.0.0</modelVersion>
  <groupId>dev.stratoscope.local</groupId>
  <artifactId>kafka-broker-fetch</artifactId>
  <version>0</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>$KAFKA_VERSION</version>
    </dependency>
$2
  </dependencies>
  <build>
    <plugins>
      <plugin>
        <groupId>org.apache.maven.plugins</groupId>
        <artifactId>maven-dependency-plugin</artifactId>
        <version>$DEP_PLUGIN_VERSION</version>
      </plugin>
    </plugins>
  </build>
</project>
EOF
}

copy_deps() { # $1 = dir with pom.xml, $2 = output dir
  if ! (cd "$1" && mvn -B -q dependency:copy-dependencies \
      -DoutputDirectory="$2" -DincludeScope=runtime -DoverWriteIfNewer=true) >"$1/mvn.log" 2>&1; then
    tail -n 30 "$1/mvn.log" >&2
    die "Maven could not resolve org.apache.kafka:kafka_2.13:$KAFKA_VERSION and its runtime dependencies (see above)"
  fi
}

ensure_kafka() {
  if [ -f "$STAMP" ] && ls "$LIBS"/kafka_2.13-"$KAFKA_VERSION".jar >/dev/null 2>&1; then
    return 0
  fi
  log "fetching org.apache.kafka:kafka_2.13:$KAFKA_VERSION and its runtime dependencies with Maven (first time only)"
  mkdir -p "$KAFKA_HOME_CACHE"
  local work out
  work="$(mktemp -d "${TMPDIR:-/tmp}/stratoscope-kafka-fetch.XXXXXX")"
  out="$KAFKA_HOME_CACHE/libs.partial"
  rm -rf "$out"
  write_pom "$work" ""
  copy_deps "$work" "$out"
  [ -f "$out/kafka_2.13-$KAFKA_VERSION.jar" ] || die "Maven finished but kafka_2.13-$KAFKA_VERSION.jar is not among the copied jars"

  # Kafka logs through slf4j -> log4j2. Add log4j-core and the slf4j binding that
  # matches the slf4j-api Kafka resolved (1.x: log4j-slf4j-impl, 2.x: log4j-slf4j2-impl)
  # unless Kafka's own runtime dependencies already brought them.
  local extra="" v binding
  v="$(ls "$out" | sed -n 's/^log4j-api-\(2\.[0-9.]*\)\.jar$/\1/p' | head -n1)"
  v="${v:-$LOG4J_FALLBACK_VERSION}"
  if ls "$out"/slf4j-api-1.*.jar >/dev/null 2>&1; then binding=log4j-slf4j-impl; else binding=log4j-slf4j2-impl; fi
  for a in "$binding" log4j-core; do
    if ! ls "$out"/"$a"-2.*.jar >/dev/null 2>&1; then
      extra+="    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>$a</artifactId><version>$v</version></dependency>"$'\n'
    fi
  done
  if [ -n "$extra" ]; then
    log "adding the log4j2 binding ($binding $v) that Kafka's dependencies did not bring"
    write_pom "$work" "$extra"
    copy_deps "$work" "$out"
  fi
  rm -rf "$work"
  rm -rf "$LIBS"
  mv "$out" "$LIBS"
  date -u +%FT%TZ >"$STAMP"
  log "cached $(ls "$LIBS" | wc -l) jars in $LIBS"
}

# --- process state ---------------------------------------------------------------
broker_pid() { # prints the pid of our running broker, or fails
  [ -f "$PIDFILE" ] || return 1
  local pid
  pid="$(cat "$PIDFILE" 2>/dev/null)"
  case "$pid" in '' | *[!0-9]*) return 1 ;; esac
  kill -0 "$pid" 2>/dev/null || return 1
  # Guard against a recycled pid: it must be a JVM running kafka.Kafka on our config.
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "kafka.Kafka $CONFIG" || return 1
  echo "$pid"
}

port_open() { # $1 = port
  (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null
}

# Ask the broker for cluster metadata over the Kafka wire protocol (Metadata v4,
# all topics) with the Python standard library only; succeed when it lists itself.
metadata_ok() {
  [ -n "$PYTHON" ] || { port_open "$KAFKA_PORT"; return; }
  "$PYTHON" - "$HOST" "$KAFKA_PORT" <<'PY' 2>/dev/null
import socket, struct, sys
host, port = sys.argv[1], int(sys.argv[2])
client = b"stratoscope-kafka-sh"
# header v1: api_key=3 (Metadata), api_version=4, correlation_id, client_id
req = struct.pack(">hhih", 3, 4, 7, len(client)) + client
req += struct.pack(">i?", -1, False)  # topics = null (all), allow_auto_topic_creation
with socket.create_connection((host, port), timeout=5) as s:
    s.settimeout(5)
    s.sendall(struct.pack(">i", len(req)) + req)
    def recv(n):
        buf = b""
        while len(buf) < n:
            chunk = s.recv(n - len(buf))
            if not chunk:
                raise SystemExit(1)
            buf += chunk
        return buf
    size = struct.unpack(">i", recv(4))[0]
    body = recv(size)
corr, _throttle, nbrokers = struct.unpack_from(">iii", body, 0)
if corr != 7 or nbrokers < 1:
    raise SystemExit(1)
off = 12
ports = []
for _ in range(nbrokers):
    _node, hlen = struct.unpack_from(">ih", body, off); off += 6 + hlen
    (bport,) = struct.unpack_from(">i", body, off); off += 4
    (rlen,) = struct.unpack_from(">h", body, off); off += 2 + max(rlen, 0)
    ports.append(bport)
raise SystemExit(0 if port in ports else 1)
PY
}

# --- config ----------------------------------------------------------------------
# The SASL_PLAINTEXT listener's lines (KAFKA_SASL_PORT): PLAIN with KAFKA_SASL_USERS.
sasl_config() {
  local users="" pair
  for pair in $KAFKA_SASL_USERS; do
    users+=" user_${pair%%=*}=\"${pair#*=}\""
  done
  echo "sasl.enabled.mechanisms=PLAIN"
  echo "listener.name.sasl_plaintext.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required$users;"
}

write_config() {
  mkdir -p "$KAFKA_DATA/logs" "$KAFKA_DATA/kraft-logs"
  local listeners="PLAINTEXT://$HOST:$KAFKA_PORT" protocols="PLAINTEXT:PLAINTEXT" sasl=""
  if [ -n "$KAFKA_SASL_PORT" ]; then
    listeners+=",SASL_PLAINTEXT://$HOST:$KAFKA_SASL_PORT"
    protocols+=",SASL_PLAINTEXT:SASL_PLAINTEXT"
    sasl="$(sasl_config)"
  fi
  cat >"$CONFIG" <<EOF
# Written by scripts/kafka.sh: single-node KRaft broker+controller on loopback.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$HOST:$CONTROLLER_PORT
listeners=$listeners,CONTROLLER://$HOST:$CONTROLLER_PORT
advertised.listeners=$listeners
listener.security.protocol.map=$protocols,CONTROLLER:PLAINTEXT
$sasl
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
log.dirs=$KAFKA_DATA/kraft-logs
num.partitions=1
default.replication.factor=1
auto.create.topics.enable=true
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
num.network.threads=2
num.io.threads=4
EOF
  chmod 600 "$CONFIG"  # it may hold the SASL users' passwords
  # WARN and above to a file in the data dir; the one INFO line kept marks "started".
  cat >"$LOG4J_CONFIG" <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="WARN">
  <Appenders>
    <File name="file" fileName="$SERVER_LOG" append="true">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
    </File>
  </Appenders>
  <Loggers>
    <Logger name="kafka.server.KafkaRaftServer" level="INFO"/>
    <Root level="WARN">
      <AppenderRef ref="file"/>
    </Root>
  </Loggers>
</Configuration>
EOF
}

# fd 9 is the start/stop lock: never let a JVM inherit it.
java_cp() { java -Xms64m -Xmx256m -Dlog4j2.configurationFile="$LOG4J_CONFIG" -cp "$LIBS/*" "$@" 9>&-; }

# --- commands --------------------------------------------------------------------
cmd_start() {
  local pid
  if pid="$(broker_pid)"; then
    log "already running (pid $pid) at $BOOTSTRAP"
    echo "KAFKA_BOOTSTRAP=$BOOTSTRAP"
    return 0
  fi
  ensure_tools
  ensure_kafka

  for p in "$KAFKA_PORT" "$CONTROLLER_PORT" $KAFKA_SASL_PORT; do
    port_open "$p" && die "port $HOST:$p is already in use by another process (set KAFKA_PORT to use another pair of ports)"
  done

  local cluster_id
  if [ "${1:-}" = resume ] && [ -f "$KAFKA_DATA/kraft-logs/meta.properties" ]; then
    # the broker a `halt` stopped, on its own data
    cluster_id="$(sed -n 's/^cluster.id=//p' "$KAFKA_DATA/kraft-logs/meta.properties")"
  else
    # A fresh, throwaway broker each start: no state survives a stop or a crash.
    rm -rf "$KAFKA_DATA"
    write_config
    cluster_id="$(java_cp kafka.tools.StorageTool random-uuid 2>>"$STDOUT_LOG" | tail -n1)" \
      || die "kafka.tools.StorageTool random-uuid failed" logs
    [ -n "$cluster_id" ] || die "kafka.tools.StorageTool random-uuid printed no cluster id" logs
    java_cp kafka.tools.StorageTool format -t "$cluster_id" -c "$CONFIG" >>"$STDOUT_LOG" 2>&1 \
      || die "formatting the KRaft storage in $KAFKA_DATA failed" logs
  fi

  log "starting Kafka $KAFKA_VERSION (cluster $cluster_id) at $BOOTSTRAP, data in $KAFKA_DATA"
  nohup java -Xms256m -Xmx512m -XX:+UseG1GC -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$LOG4J_CONFIG" -Dkafka.logs.dir="$KAFKA_DATA/logs" \
    -cp "$LIBS/*" kafka.Kafka "$CONFIG" >>"$STDOUT_LOG" 2>&1 </dev/null 9>&- &
  pid=$!
  echo "$pid" >"$PIDFILE"

  local deadline=$((SECONDS + KAFKA_START_TIMEOUT))
  while :; do
    if ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$PIDFILE"
      die "the broker exited during start-up" logs
    fi
    if port_open "$KAFKA_PORT" && metadata_ok; then
      break
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      terminate "$pid"
      rm -f "$PIDFILE"
      die "the broker did not answer metadata requests at $BOOTSTRAP within ${KAFKA_START_TIMEOUT}s (stopped it; data left in $KAFKA_DATA)" logs
    fi
    sleep 0.5
  done
  log "ready (pid $pid)"
  echo "KAFKA_BOOTSTRAP=$BOOTSTRAP"
}

# TERM, then KILL after 20 s; returns once the process is gone.
terminate() { # $1 = pid
  local pid="$1" i
  kill -TERM "$pid" 2>/dev/null || return 0
  for i in $(seq 1 40); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.5
  done
  log "pid $pid still running after 20 s: sending KILL"
  kill -KILL "$pid" 2>/dev/null || true
  for i in $(seq 1 40); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.25
  done
}

cmd_stop() {
  local pid
  if pid="$(broker_pid)"; then
    log "stopping pid $pid"
    terminate "$pid"
  else
    log "not running"
  fi
  [ "${1:-}" = halt ] || rm -rf "$KAFKA_DATA"
}

cmd_status() {
  local pid
  if pid="$(broker_pid)" && metadata_ok; then
    log "running (pid $pid) at $BOOTSTRAP"
    return 0
  fi
  if [ -n "${pid:-}" ]; then
    log "process $pid is up but $BOOTSTRAP does not answer"
  else
    log "not running"
  fi
  return 1
}

# Serialise start/stop of the same broker (e.g. two test runs at once).
with_lock() {
  if command -v flock >/dev/null 2>&1; then
    exec 9>"$KAFKA_DATA.lock"
    flock -w 300 9 || die "another scripts/kafka.sh holds $KAFKA_DATA.lock"
  fi
  "$@"
}

case "${1:-}" in
  start) with_lock cmd_start ;;
  resume) with_lock cmd_start resume ;;
  stop) with_lock cmd_stop ;;
  halt) with_lock cmd_stop halt ;;
  status) cmd_status ;;
  env) echo "KAFKA_BOOTSTRAP=$BOOTSTRAP" ;;
  *) echo "usage: $0 start|stop|halt|resume|status|env" >&2; exit 2 ;;
esac
