// The --http benchmark's server: Node's http module, keep-alive, reads the
// request body and answers 200 with a small JSON at once.
// Usage: node http-server.js PORT   (prints "listening PORT" when ready)
'use strict';
const http = require('http');

const port = Number(process.argv[2] || 8787);
const body = Buffer.from('{"ok":true}');
const server = http.createServer((req, res) => {
  req.on('data', () => {});
  req.on('end', () => {
    res.writeHead(200, { 'content-type': 'application/json', 'content-length': body.length });
    res.end(body);
  });
});
server.keepAliveTimeout = 60_000;
server.headersTimeout = 65_000;
server.listen(port, '127.0.0.1', () => console.log(`listening ${port}`));
process.on('SIGTERM', () => process.exit(0));
