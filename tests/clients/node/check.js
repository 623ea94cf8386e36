// node-postgres through pgsluice: WORKERS concurrent clients, one connection
// each. Named queries ({name, text, values}) are named prepared statements,
// parsed once per connection and then only bound and executed; queries with
// values and no name use the unnamed statement. Usage:
//
//   node check.js postgres://user:pass@host:port/db
'use strict'

const { Client, Query } = require('pg')
const { from: copyFrom, to: copyTo } = require('pg-copy-streams')
const { pipeline } = require('node:stream/promises')
const { Readable } = require('node:stream')

const URL = process.argv[2] || process.env.DATABASE_URL
if (!URL) {
  console.error('usage: node check.js postgres://user:pass@host:port/db')
  process.exit(2)
}
const WORKERS = parseInt(process.env.WORKERS || '20', 10)
const ITERS = parseInt(process.env.ITERS || '100', 10)
const DEADLINE = parseFloat(process.env.CHECK_DEADLINE || '90')
const BIG_ROWS = 10000
const BIG_WIDTH = 1000
const COPY_ROWS = 500
const T = 'sluice_node'

// ------------------------------------------------------------------ tally
let passed = 0
let failed = 0
const failures = new Map()
const started = Date.now()
const byName = new Map() // check name -> [passed, failed]
function count(name, k) {
  if (!byName.has(name)) byName.set(name, [0, 0])
  byName.get(name)[k]++
}
function ok(name) {
  passed++
  count(name, 0)
}
function fail(name, detail) {
  failed++
  count(name, 1)
  const n = failures.get(name) || 0
  failures.set(name, n + 1)
  if (n < 3) console.log(`FAIL ${name}: ${detail}`)
}
function finish(unfinished) {
  if (unfinished) {
    failed += unfinished
    console.log(`FAIL deadline: ${unfinished} worker(s) still running after ${DEADLINE}s`)
  }
  if (failed) {
    const s = [...byName.entries()].map(([k, [p, f]]) => `${k} ${p}/${p + f}`).join(', ')
    console.log(`node: by check (passed/total): ${s}`)
  }
  console.log(`node: ${((Date.now() - started) / 1000).toFixed(1)}s`)
  console.log(`${passed} passed, ${failed} failed`)
  process.exit(failed || !passed ? 1 : 0)
}
function expect(cond, detail) {
  if (!cond) throw new Error(detail)
}
async function run(name, fn, ...args) {
  try {
    await fn(...args)
    ok(name)
    return true
  } catch (e) {
    fail(name, `${e.code ? e.code + ' ' : ''}${e.message}`)
    return false
  }
}
async function expectError(code, promise, what) {
  try {
    await promise
  } catch (e) {
    expect(e.code === code, `${what}: expected SQLSTATE ${code}, got ${e.code} ${e.message}`)
    return
  }
  throw new Error(`${what}: no error (expected SQLSTATE ${code})`)
}
function rotated(items, w) {
  const k = w % items.length
  return items.slice(k).concat(items.slice(0, k))
}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms))

// ------------------------------------------------------------------ data
const SELECTS = [
  { name: 'add', text: 'SELECT $1::int * 2 + $2::int AS v', args: (i, w) => [i, w], exp: (i, w) => i * 2 + w },
  {
    name: 'concat',
    text: "SELECT $1::text || '-' || $2::int AS v",
    args: (i, w) => [`w${w}`, i],
    exp: (i, w) => `w${w}-${i}`,
  },
  { name: 'count', text: 'SELECT count(*)::int AS v FROM generate_series(1, $1::int)', args: (i) => [i], exp: (i) => i },
  {
    name: 'nulls',
    text: 'SELECT ($1::int IS NULL)::text || $2::text AS v',
    args: (i, w) => [null, `-${w}`],
    exp: (i, w) => `true-${w}`,
  },
]
function copyRows(w) {
  const rows = []
  for (let i = 0; i < COPY_ROWS; i++) rows.push([w, i, `copy\t${w}/${i} \\ é`])
  return rows
}
function copyText(rows) {
  const field = (v) => String(v).replace(/\\/g, '\\\\').replace(/\t/g, '\\t').replace(/\n/g, '\\n')
  return Buffer.from(rows.map((r) => r.map(field).join('\t') + '\n').join(''))
}
function bigRow(i) {
  return String.fromCharCode(65 + (i % 26)).repeat(BIG_WIDTH)
}

function clientConfig(w, extra) {
  return { connectionString: URL, application_name: `node-w${w}`, connectionTimeoutMillis: 60000, ...extra }
}

// ------------------------------------------------------------------ checks
async function checkNamed(c, w) {
  for (let i = 0; i < ITERS; i++) {
    for (const s of rotated(SELECTS, w)) {
      const r = await c.query({ name: s.name, text: s.text, values: s.args(i, w) })
      expect(r.rows[0].v === s.exp(i, w), `${s.name} i=${i}: expected ${s.exp(i, w)}, got ${r.rows[0].v}`)
    }
    // Same statement name, different SQL on every connection.
    const r = await c.query({ name: 'whoami', text: `SELECT ${w}::int AS w, $1::int AS i`, values: [i] })
    expect(r.rows[0].w === w && r.rows[0].i === i, `whoami i=${i}: ${JSON.stringify(r.rows[0])}`)
  }
}

async function checkUnnamed(c, w) {
  for (let i = 0; i < ITERS; i++) {
    const r = await c.query('SELECT $1::int * 3 AS v, $2::text AS t', [i, `w${w}`])
    expect(r.rows[0].v === i * 3 && r.rows[0].t === `w${w}`, `i=${i}: ${JSON.stringify(r.rows[0])}`)
  }
  const r = await c.query({ text: 'SELECT 1 AS a, 2 AS b', rowMode: 'array' }) // simple protocol
  expect(r.rows[0][0] === 1 && r.rows[0][1] === 2, `simple query: ${JSON.stringify(r.rows)}`)
}

async function checkMultiStatement(c, w) {
  const rs = await c.query(`SELECT ${w} AS a; SELECT 'two' AS b`)
  expect(rs.length === 2 && rs[0].rows[0].a === w && rs[1].rows[0].b === 'two', `multi: ${JSON.stringify(rs)}`)
}

async function checkRollback(c, w) {
  const ins = { name: 'ins', text: `INSERT INTO ${T} (w, i, s, kind) VALUES ($1, $2, 'x', $3)` }
  await c.query('BEGIN')
  await c.query({ ...ins, values: [w, 1, 'rolled-back'] })
  await c.query('ROLLBACK')
  await c.query('BEGIN')
  await c.query({ ...ins, values: [w, 2, 'committed'] })
  await c.query('SAVEPOINT s1')
  await c.query({ ...ins, values: [w, 3, 'savepoint'] })
  await c.query('ROLLBACK TO SAVEPOINT s1')
  await c.query({ ...ins, values: [w, 4, 'committed'] })
  await c.query('COMMIT')
  const r = await c.query({
    name: 'kinds',
    text: `SELECT kind, count(*)::int AS n FROM ${T} WHERE w = $1 AND kind IN ('rolled-back', 'committed', 'savepoint') GROUP BY kind ORDER BY kind`,
    values: [w],
  })
  expect(
    r.rows.length === 1 && r.rows[0].kind === 'committed' && r.rows[0].n === 2,
    `expected only 2 committed rows, got ${JSON.stringify(r.rows)}`
  )
}

async function checkErrorInTransaction(c, w) {
  await c.query('BEGIN')
  await c.query({ name: 'ins', text: `INSERT INTO ${T} (w, i, s, kind) VALUES ($1, $2, 'x', $3)`, values: [w, 1, 'doomed'] })
  await expectError('22012', c.query({ name: 'div', text: 'SELECT 100 / $1::int AS v', values: [0] }), 'division')
  await expectError('25P02', c.query('SELECT 1'), 'query in failed transaction')
  await c.query('ROLLBACK')
  const r = await c.query(`SELECT count(*)::int AS n FROM ${T} WHERE w = $1 AND kind = 'doomed'`, [w])
  expect(r.rows[0].n === 0, `${r.rows[0].n} rows of a rolled-back transaction are visible`)
}

async function checkCopy(c, w) {
  const rows = copyRows(w)
  const data = copyText(rows.map((r) => [...r, 'copy']))
  // In several chunks, so the relay sees CopyData split anywhere.
  const chunks = []
  for (let k = 0; k < data.length; k += 777) chunks.push(data.subarray(k, k + 777))
  await pipeline(Readable.from(chunks), c.query(copyFrom(`COPY ${T} (w, i, s, kind) FROM STDIN`)))
  const out = []
  for await (const chunk of c.query(
    copyTo(`COPY (SELECT w, i, s FROM ${T} WHERE w = ${w} AND kind = 'copy' ORDER BY i) TO STDOUT`)
  )) {
    out.push(chunk)
  }
  const got = Buffer.concat(out)
  const want = copyText(rows)
  expect(got.equals(want), `COPY TO: ${got.length} bytes, expected ${want.length}`)
  const r = await c.query({ name: 'n-copy', text: `SELECT count(*)::int AS n FROM ${T} WHERE w = $1 AND kind = 'copy'`, values: [w] })
  expect(r.rows[0].n === COPY_ROWS, `${r.rows[0].n} rows after COPY FROM`)
}

async function checkBigResult(c, w) {
  const r = await c.query({
    name: 'big',
    text: 'SELECT i, repeat(chr(65 + mod(i, 26)), $1) AS s FROM generate_series(0, $2 - 1) i ORDER BY i',
    values: [BIG_WIDTH, BIG_ROWS],
    rowMode: 'array',
  })
  expect(r.rows.length === BIG_ROWS, `${r.rows.length} rows`)
  for (let i = 0; i < BIG_ROWS; i++) {
    if (r.rows[i][0] !== i || r.rows[i][1] !== bigRow(i)) expect(false, `row ${i} wrong`)
  }
}

async function checkErrorRecovery(c, w) {
  await expectError('22012', c.query('SELECT 1/0'), 'simple 1/0')
  const r = await c.query('SELECT $1::int + 1 AS v', [41])
  expect(r.rows[0].v === 42, 'query after error')
  for (const [arg, want] of [[0, null], [4, 25], [0, null], [5, 20]]) {
    const q = c.query({ name: 'div', text: 'SELECT 100 / $1::int AS v', values: [arg] })
    if (want === null) await expectError('22012', q, `100/${arg}`)
    else expect((await q).rows[0].v === want, `100/${arg}`)
  }
  await expectError('42601', c.query({ name: 'bad', text: 'SELEC $1::int', values: [1] }), 'syntax error (named)')
  await expectError('42601', c.query('SELEC $1::int', [1]), 'syntax error (unnamed)')
  const s = SELECTS[0]
  const again = await c.query({ name: s.name, text: s.text, values: s.args(5, w) })
  expect(again.rows[0].v === s.exp(5, w), 'named statement after errors')
}

function submit(c, text, values) {
  let q
  const done = new Promise((resolve, reject) => {
    q = new Query(text, values, (err, res) => (err ? reject(err) : resolve(res)))
  })
  c.query(q)
  return { q, done }
}

function sendCancel(w, c, q) {
  // node-postgres' cancel API: a fresh, unconnected Client sends the
  // CancelRequest for `c`'s running query `q`.
  const canceller = new Client(clientConfig(w))
  canceller.connection.on('error', () => {})
  // cancel() itself reads pg's deprecated activeQuery getter; not our use.
  const quiet = process.noDeprecation
  process.noDeprecation = true
  try {
    canceller.cancel(c, q)
  } finally {
    process.noDeprecation = quiet
  }
  return canceller
}

async function checkCancelInTransaction(c, w) {
  const start = Date.now()
  await c.query('BEGIN')
  await c.query('SELECT 1')
  const { q, done } = submit(c, 'SELECT pg_sleep(30)')
  await sleep(300)
  sendCancel(w, c, q)
  await expectError('57014', done, 'cancelled pg_sleep')
  await c.query('ROLLBACK')
  const s = SELECTS[0]
  const r = await c.query({ name: s.name, text: s.text, values: s.args(7, w) })
  expect(r.rows[0].v === s.exp(7, w), 'query after cancel')
  expect(Date.now() - start < 15000, `cancel took ${Date.now() - start} ms`)
}

async function checkCancelAutocommit(c, w) {
  // Outside a transaction the query may still wait for a server, where a
  // cancel has nothing to hit: keep cancelling until it ends.
  const start = Date.now()
  const { q, done } = submit(c, 'SELECT pg_sleep($1)', [30])
  let settled = false
  const watched = done.then(
    (r) => ((settled = true), r),
    (e) => {
      settled = true
      throw e
    }
  )
  const loop = (async () => {
    await sleep(300)
    while (!settled) {
      sendCancel(w, c, q)
      await sleep(300)
    }
  })()
  await expectError('57014', watched, 'cancelled pg_sleep')
  await loop
  const s = SELECTS[1]
  const r = await c.query({ name: s.name, text: s.text, values: s.args(9, w) })
  expect(r.rows[0].v === s.exp(9, w), 'query after cancel')
  expect(Date.now() - start < 15000, `cancel took ${Date.now() - start} ms`)
}

async function checkPipelined(w) {
  // A second connection (opened after the first is closed, so session mode
  // with a pool of 2 cannot deadlock) in node-postgres' pipeline mode: many
  // named and unnamed queries on the wire before the first answer.
  const c = new Client(clientConfig(w, { pipeline: true }))
  await c.connect()
  try {
    const ps = []
    for (let i = 0; i < 50; i++) {
      const s = SELECTS[i % 2]
      ps.push(c.query({ name: s.name, text: s.text, values: s.args(i, w) }).then((r) => [r.rows[0].v, s.exp(i, w)]))
      ps.push(c.query('SELECT $1::int AS v', [i]).then((r) => [r.rows[0].v, i]))
    }
    ps.push(
      c.query({ name: 'div', text: 'SELECT 100 / $1::int AS v', values: [0] }).then(
        () => ['no error', '22012'],
        (e) => [e.code, '22012']
      )
    )
    const s = SELECTS[0]
    ps.push(c.query({ name: s.name, text: s.text, values: s.args(3, w) }).then((r) => [r.rows[0].v, s.exp(3, w)]))
    const results = await Promise.all(ps)
    results.forEach(([got, want], k) => expect(got === want, `pipelined query ${k}: expected ${want}, got ${got}`))
  } finally {
    await c.end()
  }
}

const WORKER_CHECKS = [
  ['named', checkNamed],
  ['unnamed', checkUnnamed],
  ['multi-statement', checkMultiStatement],
  ['rollback', checkRollback],
  ['error-in-transaction', checkErrorInTransaction],
  ['copy', checkCopy],
  ['big-result', checkBigResult],
  ['error-recovery', checkErrorRecovery],
  ['cancel-in-transaction', checkCancelInTransaction],
  ['cancel-autocommit', checkCancelAutocommit],
  ['named-again', checkNamed],
]

async function worker(w) {
  const c = new Client(clientConfig(w))
  let broken = null
  c.on('error', (e) => (broken = e))
  try {
    await c.connect()
  } catch (e) {
    fail('connect', `worker ${w}: ${e.message}`)
    return
  }
  ok('connect')
  try {
    for (const [name, fn] of WORKER_CHECKS) {
      if (broken) {
        fail(name, `worker ${w}: connection broken: ${broken.message}`)
        continue
      }
      if (!(await run(name, fn, c, w))) {
        await c.query('ROLLBACK').catch(() => {}) // a failed check may have left a transaction open
      }
    }
  } finally {
    await c.end().catch(() => {})
  }
  await run('pipeline', checkPipelined, w)
}

async function setup() {
  const c = new Client(clientConfig(-1))
  await c.connect()
  await c.query(`DROP TABLE IF EXISTS ${T}`)
  await c.query(`CREATE TABLE ${T} (w int NOT NULL, i int NOT NULL, s text NOT NULL, kind text NOT NULL)`)
  await c.end()
}

async function totals() {
  const c = new Client(clientConfig(-1))
  await c.connect()
  const r = await c.query(`SELECT kind, count(*)::int AS n FROM ${T} GROUP BY kind ORDER BY kind`)
  await c.end()
  const got = Object.fromEntries(r.rows.map((x) => [x.kind, x.n]))
  const want = { committed: 2 * WORKERS, copy: COPY_ROWS * WORKERS }
  expect(JSON.stringify(got) === JSON.stringify(want), `table totals ${JSON.stringify(got)}, expected ${JSON.stringify(want)}`)
}

async function main() {
  if (!(await run('setup', setup))) finish(0)
  let running = WORKERS
  const timer = setTimeout(() => finish(running), DEADLINE * 1000)
  await Promise.all(
    Array.from({ length: WORKERS }, (_, w) =>
      worker(w).finally(() => {
        running--
      })
    )
  )
  clearTimeout(timer)
  await run('totals', totals)
  finish(0)
}

main().catch((e) => {
  fail('main', e.stack)
  finish(0)
})
