// hp_ddr_model: the KV260's PS DDR as seen from the PL's S_AXI_HP0..3_FPD ports.
//
// Simulation only. Plain Verilog-2005 (plus $readmemh/$writememh with run-time
// file names) so that Verilator compiles it to C++ and no Python runs per beat.
//
// What is modelled (every number is a run-time cfg_* register, initialised from
// the parameter of the same meaning, overridable with a +ddr_* plusarg or
// written by the testbench through the hierarchy; see sim/ddr.py):
//   * PORTS AXI4 slave ports of DATA_W bits, INCR bursts of full-width beats;
//     bursts longer than MAX_BURST beats, narrow beats, non-INCR bursts, 4 KiB
//     crossings and WLAST mismatches are counted as protocol errors
//     (proto_errors) and reported with $display.
//   * Read latency: the first beat of a burst is presented cfg_latency cycles
//     after its AR handshake (default 30 cycles = 120 ns at 250 MHz, an
//     assumption, not a measurement).
//   * Outstanding transactions per port and direction: at most cfg_outstanding
//     bursts accepted and not finished (a read finishes with its last R beat,
//     a write with its B handshake). UG1085 gives the HP ports' AFI FIFO
//     interface a command acceptance capability of 8, hence the default 8.
//   * An aggregate bandwidth cap shared by every R and W beat of every port:
//     a token bucket filled with cfg_cap_q sixteenths of a byte per cycle
//     (default 1024 = 64 B/cycle = 16 GB/s at 250 MHz); a beat costs
//     DATA_W/8*16 tokens. Round-robin arbitration over the 2*PORTS (R, W)
//     requesters, several grants per cycle while tokens last.
//   * Optionally (cfg_shared) ports 1 and 2 (HP1, HP2) share one DDR
//     controller port: a second bucket of cfg_shared_cap_q per cycle.
//   * Error windows [lo, hi) answering SLVERR and DECERR; addresses outside
//     the modelled memory answer DECERR.
//   * Random back-pressure: with probability cfg_gap/256 per cycle and channel,
//     an xorshift32 per port withholds arready, rvalid, awready, wready, bvalid
//     (on the ports whose bit is set in cfg_gap_ports).
//   * Writes (AW/W/B, byte strobes) into the same memory; B is presented
//     cfg_wlatency cycles after the last W beat.
//
// Memory: 2**MEM_WORDS_LOG2 words of DATA_W bits at byte address MEM_BASE.
// Load: +ddr_init=<file> at time 0, or the testbench writes ctl_file (a packed
// string) and pulses ctl_load. Dump: ctl_file/ctl_dump_lo/ctl_dump_hi (word
// indices) and ctl_dump, or +ddr_dump=<file> (+ddr_dump_lo/+ddr_dump_hi) at
// $finish. The file format is $readmemh's: one word per line (word index
// `@hex` lines allowed), word = little-endian bytes, most significant first.
`timescale 1ns/1ps
`default_nettype none
// A behavioural model: blocking assignments inside the clocked block and
// mixed widths are deliberate.
/* verilator lint_off BLKSEQ */
/* verilator lint_off WIDTHEXPAND */
/* verilator lint_off WIDTHTRUNC */
/* verilator lint_off UNUSEDSIGNAL */
/* verilator lint_off UNSIGNED */

module hp_ddr_model #(
    parameter integer PORTS          = 4,
    parameter integer DATA_W         = 128,
    parameter integer ADDR_W         = 40,
    parameter integer ID_W           = 6,
    parameter integer MEM_WORDS_LOG2 = 22,        // 2**22 x 16 B = 64 MiB
    parameter [63:0]  MEM_BASE       = 64'h0,
    parameter integer QDEPTH         = 16,        // build-time ceiling of cfg_outstanding
    parameter integer MAX_BURST      = 16,
    // run-time defaults
    parameter integer LATENCY        = 30,
    parameter integer WRITE_LATENCY  = 30,
    parameter integer OUTSTANDING    = 8,
    parameter integer CAP_Q          = 1024,      // sixteenths of a byte per cycle
    parameter integer SHARED_HP12    = 0,
    parameter integer SHARED_CAP_Q   = 256,
    parameter integer GAP            = 0,         // back-pressure probability, /256
    parameter integer SEED           = 1
) (
    input  wire                    clk,
    input  wire                    rst,

    input  wire [PORTS*ADDR_W-1:0] s_axi_araddr,
    input  wire [PORTS*8-1:0]      s_axi_arlen,
    input  wire [PORTS*3-1:0]      s_axi_arsize,
    input  wire [PORTS*2-1:0]      s_axi_arburst,
    input  wire [PORTS*ID_W-1:0]   s_axi_arid,
    input  wire [PORTS-1:0]        s_axi_arvalid,
    output reg  [PORTS-1:0]        s_axi_arready,
    output reg  [PORTS*DATA_W-1:0] s_axi_rdata,
    output reg  [PORTS*2-1:0]      s_axi_rresp,
    output reg  [PORTS-1:0]        s_axi_rlast,
    output reg  [PORTS*ID_W-1:0]   s_axi_rid,
    output reg  [PORTS-1:0]        s_axi_rvalid,
    input  wire [PORTS-1:0]        s_axi_rready,

    input  wire [PORTS*ADDR_W-1:0] s_axi_awaddr,
    input  wire [PORTS*8-1:0]      s_axi_awlen,
    input  wire [PORTS*3-1:0]      s_axi_awsize,
    input  wire [PORTS*2-1:0]      s_axi_awburst,
    input  wire [PORTS*ID_W-1:0]   s_axi_awid,
    input  wire [PORTS-1:0]        s_axi_awvalid,
    output reg  [PORTS-1:0]        s_axi_awready,
    input  wire [PORTS*DATA_W-1:0] s_axi_wdata,
    input  wire [PORTS*DATA_W/8-1:0] s_axi_wstrb,
    input  wire [PORTS-1:0]        s_axi_wlast,
    input  wire [PORTS-1:0]        s_axi_wvalid,
    output reg  [PORTS-1:0]        s_axi_wready,
    output reg  [PORTS*2-1:0]      s_axi_bresp,
    output reg  [PORTS*ID_W-1:0]   s_axi_bid,
    output reg  [PORTS-1:0]        s_axi_bvalid,
    input  wire [PORTS-1:0]        s_axi_bready,

    output wire [63:0]             stat_bytes_read,
    output wire [63:0]             stat_bytes_written,
    output wire [63:0]             stat_cycles,
    output wire [31:0]             stat_protocol_errors
);
    localparam integer BYTES   = DATA_W / 8;
    localparam integer SHIFT   = $clog2(BYTES);
    localparam integer BEAT_Q  = BYTES * 16;
    localparam integer WORDS   = 1 << MEM_WORDS_LOG2;
    localparam [63:0]  MEM_END = MEM_BASE + (64'd1 << (MEM_WORDS_LOG2 + SHIFT));
    localparam integer NREQ    = 2 * PORTS;
    localparam integer QW      = $clog2(QDEPTH + 1);

    reg [DATA_W-1:0] mem [0:WORDS-1];

    // ---- run-time configuration --------------------------------------------
    reg [31:0] cfg_latency, cfg_wlatency, cfg_outstanding, cfg_cap_q, cfg_bucket_q;
    reg [31:0] cfg_shared, cfg_shared_cap_q, cfg_gap, cfg_gap_ports, cfg_seed;
    reg [63:0] cfg_slverr_lo, cfg_slverr_hi, cfg_decerr_lo, cfg_decerr_hi;
    // ---- testbench requests (set by the testbench, cleared here) -----------
    reg [8*512-1:0] ctl_file;
    reg             ctl_load, ctl_dump, ctl_stats_clear;
    reg [63:0]      ctl_dump_lo, ctl_dump_hi;

    // ---- statistics ------------------------------------------------------------
    reg [63:0] cycle;                      // since reset
    reg [63:0] st_cycles;                  // since reset or ctl_stats_clear
    reg [63:0] st_rd_beats [0:PORTS-1];
    reg [63:0] st_wr_beats [0:PORTS-1];
    reg [63:0] st_rd_bytes, st_wr_bytes;
    reg [63:0] st_first_ar, st_last_r;     // cycle of the first AR / last R beat since clear
    reg [63:0] st_token_starved;           // cycles where a ready requester lost for lack of tokens
    reg [31:0] proto_errors;
    reg [31:0] resp_errors;                // SLVERR/DECERR beats and responses given
    assign stat_bytes_read = st_rd_bytes;
    assign stat_bytes_written = st_wr_bytes;
    assign stat_cycles = st_cycles;
    assign stat_protocol_errors = proto_errors;

    // ---- per-port queues (flattened [port*QDEPTH + slot]) ------------------------
    reg [ADDR_W-1:0] rq_addr [0:PORTS*QDEPTH-1];
    reg [7:0]        rq_len  [0:PORTS*QDEPTH-1];
    reg [ID_W-1:0]   rq_id   [0:PORTS*QDEPTH-1];
    reg [63:0]       rq_time [0:PORTS*QDEPTH-1];
    reg [QW-1:0]     rq_head [0:PORTS-1];
    reg [QW-1:0]     rq_tail [0:PORTS-1];
    reg [QW-1:0]     rq_count[0:PORTS-1];
    reg [7:0]        r_beat  [0:PORTS-1];

    reg [ADDR_W-1:0] wq_addr [0:PORTS*QDEPTH-1];
    reg [7:0]        wq_len  [0:PORTS*QDEPTH-1];
    reg [ID_W-1:0]   wq_id   [0:PORTS*QDEPTH-1];
    reg [QW-1:0]     wq_head [0:PORTS-1];
    reg [QW-1:0]     wq_tail [0:PORTS-1];
    reg [QW-1:0]     wq_count[0:PORTS-1];
    reg [7:0]        w_beat  [0:PORTS-1];
    reg [1:0]        w_resp  [0:PORTS-1];  // worst response over the current burst

    reg [ID_W-1:0]   bq_id   [0:PORTS*QDEPTH-1];
    reg [1:0]        bq_resp [0:PORTS*QDEPTH-1];
    reg [63:0]       bq_time [0:PORTS*QDEPTH-1];
    reg [QW-1:0]     bq_head [0:PORTS-1];
    reg [QW-1:0]     bq_tail [0:PORTS-1];
    reg [QW-1:0]     bq_count[0:PORTS-1];

    reg [31:0] lfsr [0:PORTS-1];
    reg [63:0] tokens, shared_tokens;
    reg [31:0] rr;                         // round-robin start slot

    // ---- helpers ---------------------------------------------------------------
    function [1:0] resp_of(input [63:0] a);
        begin
            if (a < MEM_BASE || a >= MEM_END || (a >= cfg_decerr_lo && a < cfg_decerr_hi))
                resp_of = 2'b11;
            else if (a >= cfg_slverr_lo && a < cfg_slverr_hi)
                resp_of = 2'b10;
            else
                resp_of = 2'b00;
        end
    endfunction

    function [MEM_WORDS_LOG2-1:0] index_of(input [63:0] a);
        reg [63:0] off;
        begin
            off = a - MEM_BASE;
            index_of = off[SHIFT +: MEM_WORDS_LOG2];
        end
    endfunction

    function gap_bit(input [31:0] x, input integer k, input integer pp);
        begin
            gap_bit = cfg_gap_ports[pp] && ({24'd0, x[k*6 +: 8]} < cfg_gap);
        end
    endfunction

    function [31:0] xorshift(input [31:0] x);
        reg [31:0] y;
        begin
            y = x ^ (x << 13);
            y = y ^ (y >> 17);
            xorshift = y ^ (y << 5);
        end
    endfunction

    // ---- combinational: readiness, requests, token arbitration -----------------
    reg [PORTS-1:0] r_req, w_req, r_grant, w_grant;
    reg [63:0]      avail, shared_avail, t, st, bucket;
    reg             starved;
    reg [31:0]      rr_next;
    integer         p, k, slot, port;

    always @* begin
        for (p = 0; p < PORTS; p = p + 1) begin
            s_axi_arready[p] = !rst && (rq_count[p] < cfg_outstanding) && (rq_count[p] < QDEPTH)
                               && !gap_bit(lfsr[p], 0, p);
            s_axi_awready[p] = !rst && ({1'b0, wq_count[p]} + bq_count[p] < cfg_outstanding)
                               && ({1'b0, wq_count[p]} + bq_count[p] < QDEPTH) && !gap_bit(lfsr[p], 2, p);
            r_req[p] = !rst && rq_count[p] != 0 && cycle >= rq_time[p*QDEPTH + rq_head[p]]
                       && (!s_axi_rvalid[p] || s_axi_rready[p]) && !gap_bit(lfsr[p], 1, p);
            w_req[p] = !rst && wq_count[p] != 0 && s_axi_wvalid[p] && !gap_bit(lfsr[p], 3, p);
        end
        // A full bucket holds one cycle's fill plus one beat (unless cfg_bucket_q
        // says otherwise), so an idle spell cannot bank more than a beat.
        bucket = (cfg_bucket_q != 0) ? {32'd0, cfg_bucket_q} : {32'd0, cfg_cap_q} + BEAT_Q;
        avail = tokens + cfg_cap_q;
        if (avail > bucket) avail = bucket;
        shared_avail = shared_tokens + cfg_shared_cap_q;
        if (shared_avail > {32'd0, cfg_shared_cap_q} + BEAT_Q) shared_avail = {32'd0, cfg_shared_cap_q} + BEAT_Q;
        t = avail;
        st = shared_avail;
        r_grant = 0;
        w_grant = 0;
        starved = 0;
        rr_next = (rr + 1) % NREQ;
        for (k = 0; k < NREQ; k = k + 1) begin
            slot = (rr + k) % NREQ;
            port = slot >> 1;
            if ((slot[0] ? w_req[port] : r_req[port])) begin
                if (t >= BEAT_Q && (!(cfg_shared != 0 && PORTS >= 3 && (port == 1 || port == 2))
                                    || st >= BEAT_Q)) begin
                    t = t - BEAT_Q;
                    if (cfg_shared != 0 && PORTS >= 3 && (port == 1 || port == 2))
                        st = st - BEAT_Q;
                    if (slot[0]) w_grant[port] = 1'b1;
                    else r_grant[port] = 1'b1;
                    if (!starved) rr_next = (slot + 1) % NREQ;   // after the last one served...
                end else begin
                    if (!starved) rr_next = slot;                 // ...or at the first one refused
                    starved = 1'b1;
                end
            end
        end
        for (p = 0; p < PORTS; p = p + 1)
            s_axi_wready[p] = w_grant[p];
    end

    // ---- sequential -------------------------------------------------------------
    integer q, i, j;
    reg [63:0] a64;
    reg [1:0]  resp;
    reg [7:0]  len;
    reg [DATA_W-1:0] word;

    task proto(input [8*64-1:0] what, input integer pp, input [63:0] aa);
        begin
            proto_errors = proto_errors + 1;
            if (proto_errors <= 16)
                $display("hp_ddr_model: protocol error on port %0d at %0x: %0s", pp, aa, what);
        end
    endtask

    // An AR or AW request (`ch` names which) against what the HP ports accept; `aligned` is its start
    // address with the byte-in-beat bits cleared, since beats are whole aligned words.
    task check_request(input [15:0] ch, input integer pp, input [63:0] addr, input [7:0] blen,
                       input [2:0] bsize, input [1:0] btype, output [63:0] aligned);
        begin
            if (blen >= MAX_BURST) proto({ch, " burst longer than MAX_BURST"}, pp, addr);
            if (bsize != SHIFT) proto({ch, " narrow beat size"}, pp, addr);
            if (btype != 2'b01) proto({ch, " burst type is not INCR"}, pp, addr);
            aligned = addr;
            aligned[SHIFT-1:0] = 0;
            if ((aligned & 64'hFFF) + ({56'd0, blen} + 1) * BYTES > 64'h1000)
                proto({ch, " burst crosses a 4 KiB boundary"}, pp, aligned);
        end
    endtask

    always @(posedge clk) begin
        if (ctl_load) begin
            $readmemh(ctl_file, mem);
            ctl_load <= 1'b0;
        end
        if (ctl_dump) begin
            $writememh(ctl_file, mem, ctl_dump_lo[MEM_WORDS_LOG2-1:0], ctl_dump_hi[MEM_WORDS_LOG2-1:0]);
            ctl_dump <= 1'b0;
        end
        if (rst) begin
            cycle <= 0;
            tokens <= 0;
            shared_tokens <= 0;
            rr <= 0;
            for (p = 0; p < PORTS; p = p + 1) begin
                rq_head[p] = 0; rq_tail[p] = 0; rq_count[p] = 0; r_beat[p] = 0;
                wq_head[p] = 0; wq_tail[p] = 0; wq_count[p] = 0; w_beat[p] = 0; w_resp[p] = 0;
                bq_head[p] = 0; bq_tail[p] = 0; bq_count[p] = 0;
                s_axi_rvalid[p] <= 1'b0;
                s_axi_bvalid[p] <= 1'b0;
                lfsr[p] = cfg_seed * 32'h9E3779B9 + (p + 1) * 32'h7F4A7C15;
                if (lfsr[p] == 0) lfsr[p] = 32'h1;
            end
        end else begin
            cycle <= cycle + 1;
            for (p = 0; p < PORTS; p = p + 1) begin
                // AR
                if (s_axi_arvalid[p] && s_axi_arready[p]) begin
                    len = s_axi_arlen[p*8 +: 8];
                    check_request("AR", p, {{(64-ADDR_W){1'b0}}, s_axi_araddr[p*ADDR_W +: ADDR_W]}, len,
                                  s_axi_arsize[p*3 +: 3], s_axi_arburst[p*2 +: 2], a64);
                    q = p*QDEPTH + rq_tail[p];
                    rq_addr[q] = a64[ADDR_W-1:0];
                    rq_len[q] = len;
                    rq_id[q] = s_axi_arid[p*ID_W +: ID_W];
                    rq_time[q] = cycle + cfg_latency;
                    rq_tail[p] = (rq_tail[p] == QDEPTH - 1) ? 0 : rq_tail[p] + 1;
                    rq_count[p] = rq_count[p] + 1;
                    if (st_first_ar == 64'hFFFF_FFFF_FFFF_FFFF) st_first_ar <= cycle;
                end
                // R
                if (r_grant[p]) begin
                    q = p*QDEPTH + rq_head[p];
                    a64 = {{(64-ADDR_W){1'b0}}, rq_addr[q]} + {56'd0, r_beat[p]} * BYTES;
                    resp = resp_of(a64);
                    s_axi_rvalid[p] <= 1'b1;
                    s_axi_rdata[p*DATA_W +: DATA_W] <= (resp == 2'b00) ? mem[index_of(a64)] : {DATA_W{1'b0}};
                    s_axi_rresp[p*2 +: 2] <= resp;
                    s_axi_rid[p*ID_W +: ID_W] <= rq_id[q];
                    s_axi_rlast[p] <= (r_beat[p] == rq_len[q]);
                    if (resp != 0) resp_errors = resp_errors + 1;
                    st_rd_beats[p] <= st_rd_beats[p] + 1;
                    st_rd_bytes = st_rd_bytes + BYTES;
                    st_last_r <= cycle;
                    if (r_beat[p] == rq_len[q]) begin
                        r_beat[p] = 0;
                        rq_head[p] = (rq_head[p] == QDEPTH - 1) ? 0 : rq_head[p] + 1;
                        rq_count[p] = rq_count[p] - 1;
                    end else begin
                        r_beat[p] = r_beat[p] + 1;
                    end
                end else if (s_axi_rready[p]) begin
                    s_axi_rvalid[p] <= 1'b0;
                end
                // AW
                if (s_axi_awvalid[p] && s_axi_awready[p]) begin
                    len = s_axi_awlen[p*8 +: 8];
                    check_request("AW", p, {{(64-ADDR_W){1'b0}}, s_axi_awaddr[p*ADDR_W +: ADDR_W]}, len,
                                  s_axi_awsize[p*3 +: 3], s_axi_awburst[p*2 +: 2], a64);
                    q = p*QDEPTH + wq_tail[p];
                    wq_addr[q] = a64[ADDR_W-1:0];
                    wq_len[q] = len;
                    wq_id[q] = s_axi_awid[p*ID_W +: ID_W];
                    wq_tail[p] = (wq_tail[p] == QDEPTH - 1) ? 0 : wq_tail[p] + 1;
                    wq_count[p] = wq_count[p] + 1;
                end
                // W (wready == w_grant, so a grant is a handshake)
                if (w_grant[p]) begin
                    q = p*QDEPTH + wq_head[p];
                    a64 = {{(64-ADDR_W){1'b0}}, wq_addr[q]} + {56'd0, w_beat[p]} * BYTES;
                    resp = resp_of(a64);
                    if (resp == 2'b00) begin
                        word = mem[index_of(a64)];
                        for (i = 0; i < BYTES; i = i + 1)
                            if (s_axi_wstrb[p*BYTES + i])
                                word[i*8 +: 8] = s_axi_wdata[p*DATA_W + i*8 +: 8];
                        mem[index_of(a64)] <= word;
                    end
                    if (resp > w_resp[p]) w_resp[p] = resp;
                    st_wr_beats[p] <= st_wr_beats[p] + 1;
                    st_wr_bytes = st_wr_bytes + BYTES;
                    if (s_axi_wlast[p] != (w_beat[p] == wq_len[q]))
                        proto("WLAST does not match AWLEN", p, a64);
                    if (w_beat[p] == wq_len[q]) begin
                        j = p*QDEPTH + bq_tail[p];
                        bq_id[j] = wq_id[q];
                        bq_resp[j] = w_resp[p];
                        bq_time[j] = cycle + cfg_wlatency;
                        bq_tail[p] = (bq_tail[p] == QDEPTH - 1) ? 0 : bq_tail[p] + 1;
                        bq_count[p] = bq_count[p] + 1;
                        if (w_resp[p] != 0) resp_errors = resp_errors + 1;
                        w_resp[p] = 0;
                        w_beat[p] = 0;
                        wq_head[p] = (wq_head[p] == QDEPTH - 1) ? 0 : wq_head[p] + 1;
                        wq_count[p] = wq_count[p] - 1;
                    end else begin
                        w_beat[p] = w_beat[p] + 1;
                    end
                end
                // B
                if (!s_axi_bvalid[p] || s_axi_bready[p]) begin
                    j = p*QDEPTH + bq_head[p];
                    if (bq_count[p] != 0 && cycle >= bq_time[j] && !gap_bit(lfsr[p], 4, p)) begin
                        s_axi_bvalid[p] <= 1'b1;
                        s_axi_bid[p*ID_W +: ID_W] <= bq_id[j];
                        s_axi_bresp[p*2 +: 2] <= bq_resp[j];
                        bq_head[p] = (bq_head[p] == QDEPTH - 1) ? 0 : bq_head[p] + 1;
                        bq_count[p] = bq_count[p] - 1;
                    end else begin
                        s_axi_bvalid[p] <= 1'b0;
                    end
                end
                lfsr[p] = xorshift(lfsr[p]);
            end
            tokens <= avail - BEAT_Q * (count_ones(r_grant) + count_ones(w_grant));
            shared_tokens <= shared_avail - BEAT_Q * (shared_count(r_grant) + shared_count(w_grant));
            if (starved) st_token_starved <= st_token_starved + 1;
            rr <= rr_next;
            st_cycles <= st_cycles + 1;
        end
        if (ctl_stats_clear) begin
            st_cycles <= 0;
            st_rd_bytes = 0;
            st_wr_bytes = 0;
            st_first_ar <= 64'hFFFF_FFFF_FFFF_FFFF;
            st_last_r <= 0;
            st_token_starved <= 0;
            resp_errors = 0;
            for (p = 0; p < PORTS; p = p + 1) begin
                st_rd_beats[p] <= 0;
                st_wr_beats[p] <= 0;
            end
            ctl_stats_clear <= 1'b0;
        end
    end

    function integer count_ones(input [PORTS-1:0] v);
        integer n;
        begin
            count_ones = 0;
            for (n = 0; n < PORTS; n = n + 1) count_ones = count_ones + v[n];
        end
    endfunction

    function integer shared_count(input [PORTS-1:0] v);
        begin
            shared_count = 0;
            if (cfg_shared != 0 && PORTS >= 3) shared_count = v[(PORTS >= 3) ? 1 : 0] + v[(PORTS >= 3) ? 2 : 0];
        end
    endfunction

    // ---- initialisation -----------------------------------------------------------
    reg [8*512-1:0] init_file, dump_file;
    reg [63:0]      pa;
    initial begin
        cfg_latency = LATENCY;
        cfg_wlatency = WRITE_LATENCY;
        cfg_outstanding = OUTSTANDING;
        cfg_cap_q = CAP_Q;
        cfg_bucket_q = 0;
        cfg_shared = SHARED_HP12;
        cfg_shared_cap_q = SHARED_CAP_Q;
        cfg_gap = GAP;
        cfg_gap_ports = 32'hFFFF_FFFF;
        cfg_seed = SEED;
        cfg_slverr_lo = 0; cfg_slverr_hi = 0;
        cfg_decerr_lo = 0; cfg_decerr_hi = 0;
        if ($value$plusargs("ddr_latency=%d", pa)) cfg_latency = pa[31:0];
        if ($value$plusargs("ddr_write_latency=%d", pa)) cfg_wlatency = pa[31:0];
        if ($value$plusargs("ddr_outstanding=%d", pa)) cfg_outstanding = pa[31:0];
        if ($value$plusargs("ddr_cap_q=%d", pa)) cfg_cap_q = pa[31:0];
        if ($value$plusargs("ddr_bucket_q=%d", pa)) cfg_bucket_q = pa[31:0];
        if ($value$plusargs("ddr_shared=%d", pa)) cfg_shared = pa[31:0];
        if ($value$plusargs("ddr_shared_cap_q=%d", pa)) cfg_shared_cap_q = pa[31:0];
        if ($value$plusargs("ddr_gap=%d", pa)) cfg_gap = pa[31:0];
        if ($value$plusargs("ddr_gap_ports=%h", pa)) cfg_gap_ports = pa[31:0];
        if ($value$plusargs("ddr_seed=%d", pa)) cfg_seed = pa[31:0];
        if ($value$plusargs("ddr_slverr_lo=%h", pa)) cfg_slverr_lo = pa;
        if ($value$plusargs("ddr_slverr_hi=%h", pa)) cfg_slverr_hi = pa;
        if ($value$plusargs("ddr_decerr_lo=%h", pa)) cfg_decerr_lo = pa;
        if ($value$plusargs("ddr_decerr_hi=%h", pa)) cfg_decerr_hi = pa;
        ctl_load = 0; ctl_dump = 0; ctl_stats_clear = 0;
        ctl_file = 0; ctl_dump_lo = 0; ctl_dump_hi = 0;
        cycle = 0; st_cycles = 0; st_rd_bytes = 0; st_wr_bytes = 0;
        st_first_ar = 64'hFFFF_FFFF_FFFF_FFFF; st_last_r = 0; st_token_starved = 0;
        proto_errors = 0; resp_errors = 0;
        tokens = 0; shared_tokens = 0; rr = 0;
        for (p = 0; p < PORTS; p = p + 1) begin
            st_rd_beats[p] = 0; st_wr_beats[p] = 0;
            rq_head[p] = 0; rq_tail[p] = 0; rq_count[p] = 0; r_beat[p] = 0;
            wq_head[p] = 0; wq_tail[p] = 0; wq_count[p] = 0; w_beat[p] = 0; w_resp[p] = 0;
            bq_head[p] = 0; bq_tail[p] = 0; bq_count[p] = 0;
            lfsr[p] = cfg_seed * 32'h9E3779B9 + (p + 1) * 32'h7F4A7C15;
        end
        s_axi_rvalid = 0; s_axi_bvalid = 0; s_axi_rdata = 0; s_axi_rresp = 0; s_axi_rlast = 0;
        s_axi_rid = 0; s_axi_bresp = 0; s_axi_bid = 0;
        if ($value$plusargs("ddr_init=%s", init_file)) $readmemh(init_file, mem);
    end

    final begin
        if ($value$plusargs("ddr_dump=%s", dump_file)) begin
            ctl_dump_lo = 0;
            ctl_dump_hi = WORDS - 1;
            if ($value$plusargs("ddr_dump_lo=%h", pa)) ctl_dump_lo = pa;
            if ($value$plusargs("ddr_dump_hi=%h", pa)) ctl_dump_hi = pa;
            $writememh(dump_file, mem, ctl_dump_lo[MEM_WORDS_LOG2-1:0], ctl_dump_hi[MEM_WORDS_LOG2-1:0]);
        end
    end
endmodule

`default_nettype wire
