// Drives the page in headless Chromium as a person would: pick the tenant, type the input, press Generate,
// read the answer. Prints the page's results as JSON on stdout.
// usage: node drive.mjs URL CASES.json SCREENSHOT.png   (CASES: [{tenant, prompt, maxNewTokens}, ...])
import { readFileSync } from 'node:fs';
import { chromium } from 'playwright-core';

const [url, casesFile, screenshot] = process.argv.slice(2);
const cases = JSON.parse(readFileSync(casesFile, 'utf8'));
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
         '--disable-sync', '--disable-quic', '--no-first-run'],
});
try {
  const page = await browser.newPage({ viewport: { width: 1000, height: 900 } });
  const errors = [];
  page.on('pageerror', (error) => errors.push(error.message));
  await page.goto(url);
  await page.waitForFunction(() => document.body.dataset.state !== 'loading', null, { timeout: 60_000 });
  const status = await page.textContent('#status');
  if (await page.getAttribute('body', 'data-state') !== 'ready') throw new Error(`the page did not open: ${status}`);
  const results = [];
  for (const [i, { tenant, prompt, maxNewTokens }] of cases.entries()) {
    await page.selectOption('#tenant', tenant);
    await page.fill('#prompt', prompt);
    await page.fill('#max-new-tokens', String(maxNewTokens));
    await page.click('#generate');
    // each finished request adds a row to the history table; an error stops it
    await page.waitForFunction((n) => document.querySelectorAll('#history tbody tr').length === n
      || document.body.dataset.state === 'error', i + 1, { timeout: 60_000 });
    if (await page.getAttribute('body', 'data-state') === 'error') throw new Error(await page.textContent('#status'));
    results.push({
      tenant, prompt,
      text: await page.textContent('#answer'),
      tokenIds: JSON.parse(await page.getAttribute('#answer', 'data-token-ids')),
      msPerToken: Number(await page.getAttribute('#speed', 'data-ms-per-token')),
    });
  }
  await page.screenshot({ path: screenshot, fullPage: true });
  if (errors.length) throw new Error(`errors on the page: ${errors.join('; ')}`);
  process.stdout.write(JSON.stringify({ status, results }) + '\n');
} finally {
  await browser.close();
}
